"""RLRF4Rec stages 2-3: the text encoder (encoder), the rewards of each analysis (rewards), KA-SASRec against
its controls on validation (validation) and the embeddings, reward_model and rewards stages (stage). The model
and its training are in recalign.recsys, the pairs built from the rewards in recalign.pairs."""
