"""The protocol documentation and the JSON Schema stay in step with the models."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

from gurutunnel_protocol import CloseCode, ErrorCode
from gurutunnel_protocol.messages import REPLIES_BY_REQUEST
from gurutunnel_protocol.schema import document, render

DOCS = Path(__file__).resolve().parents[3] / "docs"


def _type_tags() -> set[str]:
    tags: set[str] = set()
    for schema in document()["unions"].values():
        for definition in [schema, *schema.get("$defs", {}).values()]:
            tag = definition.get("properties", {}).get("type", {})
            if "const" in tag:
                tags.add(tag["const"])
            elif "default" in tag and isinstance(tag["default"], str):
                tags.add(tag["default"])
    return tags


def test_committed_schema_matches_the_models() -> None:
    """docs/protocol.schema.json is exactly what the models generate."""
    committed = (DOCS / "protocol.schema.json").read_text()
    assert json.loads(committed) == json.loads(render()), (
        "regenerate: python -m gurutunnel_protocol.schema > docs/protocol.schema.json"
    )


def test_protocol_doc_names_every_message_type() -> None:
    """docs/protocol.md documents every frame type tag the models define."""
    text = (DOCS / "protocol.md").read_text()
    tags = _type_tags()
    assert len(tags) >= 20
    missing = sorted(tag for tag in tags if f"`{tag}`" not in text)
    assert not missing, f"undocumented message types: {missing}"


def test_protocol_doc_lists_every_error_and_close_code() -> None:
    """docs/protocol.md lists every ErrorCode value and every CloseCode number."""
    text = (DOCS / "protocol.md").read_text()
    assert not [c.value for c in ErrorCode if f"`{c.value}`" not in text]
    documented = {int(n) for n in re.findall(r"^\| (\d{4}) \|", text, flags=re.MULTILINE)}
    assert {int(c) for c in CloseCode} <= documented


def test_protocol_doc_names_exactly_the_agent_answers_of_replies_by_request() -> None:
    """The "Requests and answers" paragraph lists exactly the frames REPLIES_BY_REQUEST allows
    as answers (no frame agents never send, none missing)."""
    text = (DOCS / "protocol.md").read_text()
    paragraph = text.split("**Requests and answers.**", 1)[1].split("\n\n", 1)[0]
    listed = paragraph.split("answer (", 1)[1].split(")", 1)[0]
    named = set(re.findall(r"`([a-z_.]+)`", listed))
    replies = {t.model_fields["type"].default for ts in REPLIES_BY_REQUEST.values() for t in ts}
    assert named == replies


def test_schema_document_carries_the_protocol_version() -> None:
    """The schema names the protocol version agents must speak."""
    assert isinstance(typing.cast(int, document()["protocol_version"]), int)


def _doc_examples() -> list[dict[str, object]]:
    text = (DOCS / "protocol.md").read_text()
    block = text.split("```json", 1)[1].split("```", 1)[0]
    decoder = json.JSONDecoder()
    examples: list[dict[str, object]] = []
    pos = 0
    while True:
        while pos < len(block) and block[pos].isspace():
            pos += 1
        if pos >= len(block):
            return examples
        obj, pos = decoder.raw_decode(block, pos)
        examples.append(obj)


def test_documented_examples_validate_against_the_schema_and_the_codec() -> None:
    """Every JSON example in docs/protocol.md is a valid frame for schema and decoder alike."""
    import jsonschema

    from gurutunnel_protocol.envelope import decode_agent_to_server, decode_server_to_agent

    unions = document()["unions"]
    examples = _doc_examples()
    assert len(examples) >= 6
    for example in examples:
        raw = json.dumps(example)
        directions = []
        for name, decode in (
            ("ServerToAgent", decode_server_to_agent),
            ("AgentToServer", decode_agent_to_server),
        ):
            try:
                jsonschema.validate(example, unions[name])
            except jsonschema.ValidationError:
                continue
            decode(raw)
            directions.append(name)
        assert directions, f"example matches no union: {raw[:120]}"
