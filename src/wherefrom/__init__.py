"""wherefrom: which training examples made a language model say this?"""
