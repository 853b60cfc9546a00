"""Data: everything from the raw inputs to data/processed, and conversations as tokens. chatml.py is the ChatML row
(validation, loading, text normalisation), sources.py the formats of your own datasets, and one module per data stage:
stackexchange.py (with html_markdown.py) for collect, generate.py for generate (with teacher_endpoint.py, its teacher
behind an OpenAI-compatible server, and answer_cache.py, the teacher's answers kept between runs), combine.py for
combine, stats.py for stats; dataset.py renders and tokenises conversations with the model's chat template (for
train, evaluate, serving). May import expqa.config, files, progress and wording; generate.py alone also
serving.inference and model.loading (its teacher model writes the pairs). Never training, evaluation or a serving
command; a stage module never imports another's.
"""
