"""Digests of toy-world bases that committed measurements name (docs/toy_world.md, "The main run")."""

# Step 26 000: shipped until 2026-12-05; the held-out verdict of docs/results.md ran on it.
STEP_26000 = {"unet": "73e30980585199ba643bb42bf8cfd6cc869b6fb02e363fe8e975284afc3f6777",
              "clip": "9b248749dad7f89d24b90f34124e6f511a5a2bed6ce13ab5ed5cac804b4a0b1c",
              "vae": "018dddb59cf138d3587366952e7634a637b24e695661e9409a8e746b87451ac2"}
# Step 31 836 (twins and hidden-word hints): shipped since 2026-12-05.
STEP_31836 = {"unet": "5778aefc0a04886cdb8061ec05160e14e14621152b8dc4af60513fb2ab462275",
              "clip": "915408287417118af2cf0a66e51d44c19cc41e67169b6b78fc7913ad231a3d4c",
              "vae": "cc8b3cc485dd18b23d366d3440718308fda5213115f9db0669c503aad05ab629"}
