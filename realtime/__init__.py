"""Duet's realtime layer: server, sessions, protocol events, audio, VAD and listening."""
