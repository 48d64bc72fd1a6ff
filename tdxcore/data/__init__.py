"""The TDX module's own tables as CSV package data (status codes, S-EPT states, legality)."""
