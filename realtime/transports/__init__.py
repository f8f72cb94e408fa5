"""Transports: adapters between a wire format and the session core (WebSocket/OpenAI Realtime, telephony)."""
