"""Library noise is silenced message by message; everything else still shows (expqa.noise)."""

import logging
import warnings

from expqa import noise


def test_only_the_listed_messages_are_silenced(caplog):
    bnb = logging.getLogger(noise.BNB_CPU_KERNEL_LOGGER)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")  # pytest's own filters, as a stage starts
        noise.install()
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "x")
        bnb.warning("some other bitsandbytes warning")
        warnings.warn(
            "`use_liger_kernel=True` is deprecated and will be removed in v2.0.0.", FutureWarning, stacklevel=1
        )
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    assert [record.getMessage() for record in caplog.records] == ["some other bitsandbytes warning"]
    assert [str(warning.message) for warning in shown] == ["another deprecation"]


def test_importing_expqa_installs_the_filters():
    import expqa  # noqa: F401  (already imported: the filter must be there)

    assert any(isinstance(f, noise._DropMessage) for f in logging.getLogger(noise.BNB_CPU_KERNEL_LOGGER).filters)
