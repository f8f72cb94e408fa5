"""Clients for Duet's server: WebSocket library, file client, microphone CLI."""
