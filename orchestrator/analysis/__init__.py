"""Numbers from stored studies: statistics, sample/trial/study metrics, decisions."""
