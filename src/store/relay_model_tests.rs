//! A randomized model test of the claim / defer / settle protocol.
