"""Duet's realtime layer: speech input (speech_in), the shared runtime, the session core (core) and the
transports (transports) that carry it over the wire. Imports run one way: speech_in -> runtime -> core -> transports."""
