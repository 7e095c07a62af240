"""Serving: request checks and batched drawing (``service``, no Ray) behind Ray Serve +
FastAPI (``app``) and a self-contained page (``page.html``)."""
