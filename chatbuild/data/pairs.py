"""Preference pairs: a prompt (the conversation so far, ending with a user turn) and two replies to it,
one preferred (`chosen`) over the other (`rejected`). What DPO and ORPO train on.

One pair per line in chatbuild's own JSONL form (what `chatbuild data prepare --mode pairs` writes):

    {"prompt": [{"role": "user", "content": "..."}], "chosen": {"role": "assistant", "content": "..."},
     "rejected": {"role": "assistant", "content": "..."}, "message_tree_id": "...", "lang": "en"}

`Pair` is the in-memory form; `check_pair` is the one place the rules are written down.
"""

from dataclasses import dataclass

from chatbuild.errors import UserError
from chatbuild.templates import check_messages


@dataclass(frozen=True)
class Pair:
    prompt: tuple[dict, ...]  # messages; an optional system message first, turns alternate, the last is "user"
    chosen: str
    rejected: str
    message_tree_id: str | None = None  # what the train/validation split groups by (OASST1 tree)
    lang: str | None = None

    def to_json(self) -> dict:
        return {"prompt": [dict(m) for m in self.prompt], "chosen": {"role": "assistant", "content": self.chosen},
                "rejected": {"role": "assistant", "content": self.rejected},
                "message_tree_id": self.message_tree_id, "lang": self.lang}


def check_pair(pair: Pair, where: str = "pair") -> None:
    """UserError naming `where` when the pair cannot be trained on: a prompt that is not a conversation
    ending with a user turn, an empty reply, or a chosen reply equal to the rejected one."""
    prompt = list(pair.prompt)
    check_messages(prompt, where=f"{where}, prompt")
    if prompt[-1]["role"] != "user":
        raise UserError(f'{where}: the prompt must end with a user turn (it ends with "{prompt[-1]["role"]}")')
    for field, reply in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if not isinstance(reply, str) or not reply.strip():
            raise UserError(f'{where}, field "{field}": the reply is empty')
    if pair.chosen.strip() == pair.rejected.strip():
        raise UserError(f"{where}: chosen and rejected are the same reply")
