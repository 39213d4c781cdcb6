"""The OpenAI-compatible routes every server mounts beside its own API (servers/*.py): one list, so a route added
here is served by every model family."""

from presets.api.openai import openai
from presets.api.responses import responses
from presets.api.tokenize import tokenizer_routes

OPENAI_ROUTES = [openai, responses, tokenizer_routes]
