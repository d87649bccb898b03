"""RLRF4Rec stages 2-4: text encoder (encoder), reward computation (rewards), KA vs SASRec on validation
(validation) and the stage functions over a run dir (stages). The model lives in models/ka_sasrec.py,
its Ray Train loop in train/ka_train.py, the preference pairs in pairs.py."""
