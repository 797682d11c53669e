"""Request and response bodies, as the OpenAPI schema shows them."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator


class UIMessagePart(BaseModel):
    """One part of an AI SDK `UIMessage`; only text parts make the message, other kinds are skipped."""

    model_config = ConfigDict(strict=True)

    type: str
    text: str | None = None


class UIMessage(BaseModel):
    model_config = ConfigDict(strict=True)

    id: str | None = None
    role: str
    parts: list[UIMessagePart] = Field(default_factory=list)


class ChatRequest(BaseModel):
    # Strict: a number where a string belongs is the client's bug, reported as 422, never coerced.
    model_config = ConfigDict(strict=True, populate_by_name=True)

    message: str | None = Field(
        None,
        validation_alias=AliasChoices("message", "user_input"),
        description="The user's message (alias: user_input). Omit it when regenerating.",
        json_schema_extra={"minLength": 1},
    )
    regenerate: bool = Field(False, description="Ask again for the session's last user message.")
    system: str | None = Field(None, description="A system prompt for this turn.")
    model: str | None = Field(None, description="One of the allowed models; the default when omitted.")
    # Ranges are documented rather than enforced here: the chat service answers them with a 400.
    max_tokens: int | None = Field(
        None, description="1 up to the configured limit.", json_schema_extra={"minimum": 1}
    )
    temperature: float | None = Field(
        None, description="0 to 1.", json_schema_extra={"minimum": 0, "maximum": 1}
    )
    # The AI SDK's own body (`DefaultChatTransport`, `TextStreamChatTransport`). The server keeps the
    # history, so of `messages` only the last user message is read: earlier ones are not trusted.
    id: str | None = Field(None, description="AI SDK: the chat id, which is the session id on POST /chat.")
    messages: list[UIMessage] | None = Field(
        None, description="AI SDK: the chat's messages; the text parts of the last user message are sent."
    )
    trigger: Literal["submit-message", "regenerate-message"] | None = Field(
        None, description="AI SDK: `regenerate-message` regenerates the last reply."
    )
    message_id: str | None = Field(
        None,
        validation_alias=AliasChoices("messageId", "message_id"),
        description="AI SDK: the id of the message regenerated; not used.",
    )

    @model_validator(mode="after")
    def _from_ui_messages(self) -> ChatRequest:
        if self.messages is None:
            return self
        if self.message is not None or self.regenerate:
            raise ValueError("send either message or regenerate, or the AI SDK's messages and trigger")
        if self.trigger == "regenerate-message":
            self.regenerate = True
            return self
        for ui_message in reversed(self.messages):
            if ui_message.role == "user":
                self.message = "".join(
                    part.text for part in ui_message.parts if part.type == "text" and part.text
                )
                break
        return self


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class StoredMessage(BaseModel):
    id: str
    role: str
    content: str
    created_at: str
    tokens: int


class SessionHistory(BaseModel):
    session_id: str
    messages: list[StoredMessage] = Field(description="One page of the history, oldest first.")
    next_before: str | None = Field(
        description="Pass it as `before` to read the page of older messages; null on the oldest page."
    )


class NewSession(BaseModel):
    session_id: str


class UsageCounts(BaseModel):
    turns: int = Field(description="Turns that reached Claude, cut and failed ones included.")
    input_tokens: int = Field(description="Prompt tokens neither read from nor written to the prompt cache.")
    output_tokens: int
    cache_read_input_tokens: int = Field(description="Prompt tokens read from the cache (a tenth the price).")
    cache_creation_input_tokens: int = Field(description="Prompt tokens written to the cache.")


class UsageRow(UsageCounts):
    day: str = Field(description="A UTC day, YYYY-MM-DD.")
    model: str


class Usage(BaseModel):
    key: str | None = Field(
        None, description="The calling key's name, where keys are named; null otherwise. Never the key."
    )
    from_: str = Field(alias="from", description="The first day of the range, YYYY-MM-DD (UTC).")
    to: str = Field(description="The last day of the range, included.")
    usage: list[UsageRow] = Field(description="One row per day and model that had usage, oldest first.")
    total: UsageCounts = Field(description="The rows added up.")
