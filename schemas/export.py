"""Write the JSON Schema of every message: `python -m schemas.export [DIR]`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel, TypeAdapter

from schemas import jobs, messages, node_api, openai_api, usage

API_MODELS: list[type[BaseModel]] = [
    openai_api.JobRequest,
    jobs.JobCreated,
    jobs.JobRecord,
    jobs.JobUpdate,
    jobs.ErrorResponse,
    messages.Envelope,
    openai_api.ChatCompletionRequest,
    openai_api.CompletionRequest,
    openai_api.EmbeddingRequest,
    openai_api.ChatCompletionChunk,
    openai_api.ChatCompletion,
    openai_api.EmbeddingList,
    openai_api.OpenAiErrorBody,
    node_api.Health,
    usage.UsageReport,
]


def all_schemas() -> dict[str, object]:
    from handlers.admin import AdminMessage  # the table of admin messages is the handlers' (it names their handlers)

    schemas: dict[str, object] = {model.__name__: model.model_json_schema() for model in API_MODELS}
    schemas.update(messages.json_schemas())
    schemas["admin_message"] = TypeAdapter(AdminMessage).json_schema()
    return schemas


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "schemas/json")
    out.mkdir(parents=True, exist_ok=True)
    for name, schema in all_schemas().items():
        (out / f"{name}.json").write_text(json.dumps(schema, indent=2) + "\n")
    print(f"wrote {len(all_schemas())} schemas to {out}")


if __name__ == "__main__":
    main()
