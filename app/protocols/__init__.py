"""Protocol doors: each module is a FastAPI router adapting one wire protocol to the core."""
