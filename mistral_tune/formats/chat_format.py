"""The chat format of a run: a template and the Mistral vocabulary whose ids it uses.

The data stage resolves it once (`ChatFormat.resolve`, from `template=` and the model) and writes
it to run_dir/data/format.json with the HF tokenizer in run_dir/tokenizer; every later stage
(train, merge, eval, chat, pairs) reads it back with `ChatFormat.load` and encodes through it, so
no stage re-derives the format from the config. Re-deriving is how eval and merge once encoded
chatml on a v3 model with the v1 vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from omegaconf import DictConfig

from mistral_tune.errors import UserError
from mistral_tune.formats import templates
from mistral_tune.runs import RunDir, atomic_write_text


@dataclass(frozen=True)
class ChatFormat:
    template: str  # mistral_v1 | mistral_v3 | mistral_v7 | chatml | zephyr
    vocab: str  # the Mistral format whose tokenizer file gives the ids (the template itself for Mistral formats)

    @classmethod
    def resolve(cls, cfg: DictConfig) -> ChatFormat:
        """From the config: `template=auto` is the model's own format (`model.default_template`;
        `auto` there reads the checkpoint's vocabulary); chatml and zephyr take the model's
        vocabulary. A checkpoint that can be read must have the vocabulary the format encodes
        with: a v1 template on a v3 checkpoint trains on ids that mean something else to it."""
        checkpoint = _checkpoint(cfg)
        default = cfg.model.default_template
        if default == "auto":
            if checkpoint is None or checkpoint.vocab is None:
                name = cfg.model.name_or_path
                why = ("the random tiny model has no checkpoint" if not name else
                       f"{name} holds no tokenizer file" if checkpoint else
                       f"{name} is not a local folder and not in the Hugging Face cache (nothing is downloaded)")
                raise UserError(f"template=auto reads the checkpoint's vocabulary: {why}",
                                hint="set template=mistral_v1|mistral_v3|mistral_v7 (or download the model first)")
            default = checkpoint.vocab
        name = cfg.template.name
        template = default if name == "auto" else name
        if template not in templates.ALL_TEMPLATES:
            raise UserError(f"template={template!r} is not one of {', '.join(templates.ALL_TEMPLATES)}")
        vocab = default if template in templates.TEXT_TEMPLATES else template
        if vocab not in templates.TEMPLATES:
            raise UserError(f"{template} needs a Mistral vocabulary: model.default_template={vocab!r} is not one of "
                            f"{', '.join(templates.TEMPLATES)}")
        if checkpoint is not None and checkpoint.vocab not in (None, vocab):
            raise UserError(f"template {template} encodes with the {vocab} vocabulary, but {checkpoint.path} has the "
                            f"{checkpoint.vocab} vocabulary ({checkpoint.evidence})",
                            hint="use template=auto (chatml and zephyr take the checkpoint's vocabulary)")
        return cls(template, vocab)

    @staticmethod
    def describe_auto(cfg: DictConfig) -> str:
        """Where `template=auto` took the format from, for the run's log."""
        if cfg.model.default_template != "auto":
            return f"model.default_template={cfg.model.default_template}"
        checkpoint = _checkpoint(cfg)
        return f"{checkpoint.path}: {checkpoint.evidence}"

    @classmethod
    def load(cls, run_dir: RunDir, needed_by: str) -> ChatFormat:
        """The format fixed by the run's data stage."""
        path = run_dir.chat_format
        if not path.exists():
            raise UserError(f"{needed_by} needs the chat format of the run's data stage ({path}), found none",
                            hint=f"run `mistral-tune data run_dir={run_dir.root}` first (or `mistral-tune pipeline`)")
        return cls(**json.loads(path.read_text()))

    def save(self, run_dir: RunDir) -> None:
        atomic_write_text(run_dir.chat_format, json.dumps(asdict(self), indent=2) + "\n")

    @property
    def _vocab_arg(self) -> dict:
        return {"vocab": self.vocab} if self.template in templates.TEXT_TEMPLATES else {}

    def encode_chat(self, messages: list[dict], train_on: str = "assistant", verify: bool = True) -> templates.Encoded:
        return templates.encode_chat(messages, self.template, train_on=train_on, verify=verify, **self._vocab_arg)

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        return templates.encode_prompt(messages, self.template, **self._vocab_arg)

    def encode_preference(self, prompt: list[dict], chosen, rejected,
                          verify: bool = True) -> tuple[list[int], list[int], list[int]]:
        return templates.encode_preference(prompt, chosen, rejected, self.template, verify=verify, **self._vocab_arg)

    def tokenizer_file(self):
        return templates.mistral_tokenizer_file(self.template, self.vocab if self._vocab_arg else None)

    def hf_tokenizer(self):
        from mistral_tune.formats.tokenizer import build_hf_tokenizer

        return build_hf_tokenizer(self.template, self.vocab if self._vocab_arg else None)


def _checkpoint(cfg: DictConfig):
    """What the pretrained checkpoint says about its vocabulary; None for the tiny model or a hub id
    that is not in the local cache (nothing is downloaded to find out)."""
    from mistral_tune.formats.checkpoint import inspect_checkpoint, locate

    name = cfg.model.name_or_path
    if not name or locate(name, cfg.model.revision) is None:
        return None
    return inspect_checkpoint(name, cfg.model.revision)
