"""What every package may use: configuration, errors, audio codecs and rates, the playback clock."""
