"""Data for unlearning and evaluation: loaders, prompt formatting, tokenisation, pairing, synthetic rows."""
from grun_fast.data.collate import ForgetSchedule, PairedCollator, retain_index_for
from grun_fast.data.encoding import IGNORE_INDEX, encode_example, encode_rows, pad_examples, pad_token_id_of, \
    tokenize_rows
from grun_fast.data.loading import TOFU_HUB_NAME, chunk_document, load_documents, load_qa_file, load_rows, \
    load_tofu, validate_rows
from grun_fast.data.prompts import PLAIN_TEMPLATE, answer_ids, check_template, format_prompt, format_variants, \
    prompt_ids, resolve_template, row_prompt
from grun_fast.data.refusals import REFUSALS, with_refusals
from grun_fast.data.suffixes import with_answer_suffixes
from grun_fast.data.synthetic import general_knowledge, make_authors, make_benchmark, split_by_author

__all__ = [
    "ForgetSchedule", "PairedCollator", "retain_index_for", "IGNORE_INDEX", "encode_example", "encode_rows",
    "pad_examples", "pad_token_id_of", "tokenize_rows", "TOFU_HUB_NAME", "chunk_document", "load_documents",
    "load_qa_file", "load_rows", "load_tofu", "validate_rows", "PLAIN_TEMPLATE", "answer_ids", "format_prompt",
    "format_variants", "resolve_template", "check_template",
    "prompt_ids", "row_prompt", "REFUSALS", "with_refusals", "with_answer_suffixes", "general_knowledge",
    "make_authors", "make_benchmark", "split_by_author",
]
