"""The documentation site (built by MkDocs from the Markdown pages here)."""
