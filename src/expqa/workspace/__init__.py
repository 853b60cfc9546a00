"""Workspace: what acts on the checkout as a whole rather than on one stage: finding it (project.py), `expqa verify`
(verify.py: this run's metrics against the committed ones) and `expqa pull` (pull.py: dvc pull that says what no
remote has). Imports only the standard library, PyYAML and the git/dvc commands; any command may import it.
"""
