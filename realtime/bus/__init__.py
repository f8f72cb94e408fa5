"""Buses that carry a server's sessions to other systems: `mqtt.py`, the MQTT event and control bus and tools."""
