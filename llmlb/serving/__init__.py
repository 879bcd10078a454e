"""The OpenAI protocol, free of Flask: request validation, response shaping, SSE."""
