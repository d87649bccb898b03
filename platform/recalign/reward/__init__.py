"""RLRF4Rec stages 2-4: text encoder (encoder), reward computation (rewards), KA vs SASRec on validation
(validation) and the stage functions over a run dir (stages). The model lives in recsys/ka_sasrec.py,
its Ray Train loop in recsys/ka_train.py, the preference pairs in pairs/build.py."""
