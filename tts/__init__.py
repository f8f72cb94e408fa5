"""Speech synthesis: text -> phoneme ids (speech tokens) -> waveform (vocoder)."""
