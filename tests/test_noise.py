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


def test_peft_reading_the_old_checkpointing_name_and_the_share_line_are_silenced(caplog):
    """The real transformers property peft's PeftModel() reads, and the Trainer's real logger at the INFO level the
    train stage gives it; a FutureWarning of the same module with another message, and other records, still show."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    model = LlamaForCausalLM(config)
    trainer_log = logging.getLogger(noise.TRAINER_LOGGER)
    seen = []
    records = logging.Handler()  # its own handler: whether transformers' loggers reach the root one varies
    records.emit = lambda record: seen.append(record.getMessage())
    trainer_log.addHandler(records)
    with caplog.at_level(logging.INFO, logger=noise.TRAINER_LOGGER), warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        noise.install()
        assert model.is_gradient_checkpointing is False
        warnings.warn_explicit(
            "`other` is deprecated", FutureWarning, "modeling_utils.py", 1, "transformers.modeling_utils"
        )
        trainer_log.info("\n\nTraining completed. Do not forget to share your model on huggingface.co/models =)\n\n")
        trainer_log.info("Saving model checkpoint to %s", "ckpt/checkpoint-2")
    trainer_log.removeHandler(records)
    assert [str(warning.message) for warning in shown] == ["`other` is deprecated"]
    assert seen == ["Saving model checkpoint to ckpt/checkpoint-2"]
