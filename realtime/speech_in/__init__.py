"""Speech input: the VAD and turn segmenter, the listener (ASR) and the barge-in guard."""
