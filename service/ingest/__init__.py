"""Getting a source in safely: the URL policy (SSRF rules), fetching and probing."""
