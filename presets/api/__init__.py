"""The HTTP APIs: Kaito's preset API (Llama and Falcon routes), the OpenAI API, llm-api's API; request
validation, chat rendering, streamed text."""
