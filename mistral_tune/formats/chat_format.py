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
        """From the config: `template=auto` is the model's own format; chatml and zephyr take the
        model's vocabulary (mistral_v1 for v0.1, mistral_v3 for v0.3)."""
        name = cfg.template.name
        template = cfg.model.default_template if name == "auto" else name
        if template not in templates.ALL_TEMPLATES:
            raise UserError(f"template={template!r} is not one of {', '.join(templates.ALL_TEMPLATES)}")
        vocab = cfg.model.default_template if template in templates.TEXT_TEMPLATES else template
        if vocab not in templates.TEMPLATES:
            raise UserError(f"{template} needs a Mistral vocabulary: model.default_template={vocab!r} is not one of "
                            f"{', '.join(templates.TEMPLATES)}")
        return cls(template, vocab)

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
