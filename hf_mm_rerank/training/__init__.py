"""Training: the trainers, the TrainingArguments fixes, checkpoint layout and atomic writes, throughput, the Hub push."""
