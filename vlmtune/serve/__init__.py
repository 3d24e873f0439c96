"""`vlmtune serve`: an OpenAI chat-completions endpoint and a web chat page over one loaded Generator.

    cli -> serve.app.main: loading.load_generator (as chat) -> Batcher (one worker thread, static batches)
        -> uvicorn(FastAPI app): /v1/chat/completions, /v1/models, /health, / (page.html)

wire.py turns a request body into a Job (prompt ids, images, settings) or an OpenAI-style 4xx error naming
the field; batcher.py groups jobs with the same sampling settings and runs them through
Generator.generate_ids, streaming each row's text from a per-row stopping criterion.
"""
