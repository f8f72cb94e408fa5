"""Speech input: VAD and turn segmenter (server_vad; semantic_vad with Smart Turn), listener (ASR), barge-in guard."""
