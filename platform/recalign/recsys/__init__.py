"""The sequential recommenders: SASRec and the knowledge-augmented KA-SASRec, their training under Ray Train,
and the sasrec stage."""
