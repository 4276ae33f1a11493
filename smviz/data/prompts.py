"""How a question or prompt is put to a model: the prompt formats (`PROMPT_FORMATS`, `PromptFormat`,
`get_prompt_format`), each owning the prompt text, its token ids, the ids of a prompt with its answer
(for scoring P(answer | prompt)) and the training text of a question with its answer.

The formats:
- `qa`: the closed-book QA prompt of the fact world, `qa_prompt(question)` ("Question: {q}\\nAnswer:"),
  encoded with the tokenizer's default special tokens; trained on as `qa_text(q, a)` without its
  final newline.
- `completion`: the text as is, for editing prompts that the answer completes ("The mother tongue
  of Danielle Darrieux is" ... "French"); default special tokens; trained on as "{q} {a}".
- `chat`: the tokenizer's chat template with one user turn and the generation prompt, encoded
  without adding special tokens (the template already holds its own); trained on as the template of
  the user turn and the assistant's answer. A chat-tuned model asked with a plain prompt often
  answers nothing at all, so real chat models want `chat`; a tokenizer without a chat_template
  cannot use it.

An answer is the text after the prompt: for `qa` and `completion` it follows after one space
(ROME's convention), for `chat` it starts right after the generation prompt. Generated answers are
decoded without special tokens (`smviz.evaluate.qa`). Editing prompts are completions whatever format
the questions use, except with `chat` (`edit_prompt_format`).
"""

from __future__ import annotations

from dataclasses import dataclass

from smviz.data.facts import qa_prompt, qa_text
from smviz.errors import ConfigError

PROMPT_FORMATS = ("qa", "completion", "chat")


def _ids(tokenizer, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


# Tokens an answer may take: a chat model answers in a sentence ("The author of Dracula is Bram Stoker.").
ANSWER_TOKENS = {"qa": 12, "completion": 12, "chat": 24}


@dataclass(frozen=True)
class PromptFormat:
    name: str

    def __post_init__(self) -> None:
        if self.name not in PROMPT_FORMATS:
            raise ConfigError(f"unknown prompt format {self.name!r}; choose one of {', '.join(PROMPT_FORMATS)}")

    def check(self, tokenizer) -> None:
        """ConfigError when `tokenizer` cannot put prompts in this format (chat without a chat template)."""
        if self.name == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "prompt format 'chat' needs a tokenizer with a chat_template, and this model's tokenizer has "
                "none; use prompt format 'qa' or 'completion'"
            )

    @property
    def answer_tokens(self) -> int:
        """How many tokens a generated answer may take in this format (`ANSWER_TOKENS`)."""
        return ANSWER_TOKENS[self.name]

    def prompt(self, tokenizer, question: str) -> str:
        """The text put to the model for `question`."""
        if self.name == "qa":
            return qa_prompt(question)
        if self.name == "completion":
            return question
        self.check(tokenizer)
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )

    def encode_prompt(self, tokenizer, question: str) -> list[int]:
        """The token ids of `prompt(question)`, special tokens as the format wants them."""
        return _ids(tokenizer, self.prompt(tokenizer, question), add_special_tokens=self.name != "chat")

    def encode_pair(self, tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids): the answer as it follows the prompt, without special tokens."""
        answer_text = answer if self.name == "chat" else " " + answer
        return self.encode_prompt(tokenizer, question), _ids(tokenizer, answer_text, add_special_tokens=False)

    def training_text(self, tokenizer, question: str, answer: str) -> str:
        """`question` with its `answer`, as one training text."""
        if self.name == "qa":
            return qa_text(question, answer).rstrip("\n")
        if self.name == "completion":
            return f"{question} {answer}"
        self.check(tokenizer)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return tokenizer.apply_chat_template(messages, tokenize=False)


def get_prompt_format(name: str) -> PromptFormat:
    """The prompt format called `name` (one of `PROMPT_FORMATS`); ConfigError naming them otherwise."""
    return PromptFormat(name)


def edit_prompt_format(question_format: str) -> str:
    """The format editing prompts are put in when questions are put in `question_format`: editing
    prompts are completions ("The mother tongue of X is"), unless the run talks to a chat model."""
    get_prompt_format(question_format)
    return "chat" if question_format == "chat" else "completion"
