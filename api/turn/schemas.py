"""Request and response bodies, as the OpenAPI schema shows them."""

from __future__ import annotations

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


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
