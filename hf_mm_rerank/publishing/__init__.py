"""Publishing a trained model: model cards (+ ``templates/``), card usage snippets, serving notes and exports."""
