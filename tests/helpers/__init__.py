"""What the tests share: real server processes, tiny checkpoints, the real model, case builders."""
