"""The session core: one conversation's state and events. It never sees a wire format: transports translate."""
