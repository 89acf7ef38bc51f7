"""Real server, gateway and CLI processes, talked to with real clients."""
