"""Model inputs of a policy and the packed forward that scores responses.

`chat_prompt` writes the chat-templated prompt text with its one image; `encode_prompts` gives left-padded generation inputs; `encode_prompt_response` right-padded
teacher-forcing rows (one per response); `encode_groups` the rows of several (prompt, image,
responses) groups, by default one row per group with the prompt shared by its responses (Prefix
Grouper); `response_hidden` runs such rows through the model, the vision tower once per image, and
returns the hidden states that predict each response token (the learner's loss and the adversary's
entropy apply the language-model head to them).
"""

from __future__ import annotations

import inspect

import torch


def chat_prompt(processor, problem: str, format_prompt: str = "") -> str:
    """Chat-templated prompt text with one image where `<image>` stood (first, when it is absent).

    A data set may hold several `<image>` marks for one image (geometry3k does not, MM-Eureka rarely);
    only the first becomes the image, the rest are dropped, so the image pad count always matches.
    """
    before, mark, after = (problem + format_prompt).partition("<image>")
    if not mark:
        before, after = "", before
    after = after.replace("<image>", "")
    content = ([{"type": "text", "text": before}] if before.strip() else []) + [{"type": "image"}]
    if after.strip():
        content.append({"type": "text", "text": after})
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(processor, texts: list[str], images: list) -> dict[str, torch.Tensor]:
    """Left-padded generation inputs for prompts with one image each.

    Returns input_ids, attention_mask, mm_token_type_ids ([B, L] int64), pixel_values
    ([patches, C*T*14*14] float32) and image_grid_thw ([B, 3] int64).
    """
    processor.tokenizer.padding_side = "left"
    enc = processor(text=texts, images=images, padding=True, return_tensors="pt")
    return dict(enc)


def encode_prompt_response(processor, texts: list[str], images: list,
                           responses: list[list[int] | torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded teacher-forcing inputs `prompt + response` and the mask of response tokens.

    `responses[i]` are token ids ([T_i] int64). Returns the model inputs (input_ids, attention_mask,
    mm_token_type_ids [B, L] int64; pixel_values [patches, D] float32; image_grid_thw [B, 3] int64)
    and `response_mask` ([B, L] bool, True at the positions of response tokens). The logits that
    predict response token j sit one position earlier: use `response_mask[:, 1:]` against
    `logits[:, :-1]`.
    """
    processor.tokenizer.padding_side = "left"
    enc = processor(text=texts, images=images, padding=True, return_tensors="pt")
    keep = enc["attention_mask"].bool()
    prompts = [(enc["input_ids"][i][keep[i]], enc["mm_token_type_ids"][i][keep[i]]) for i in range(len(texts))]
    inputs, response_mask = _right_padded(prompts, responses, processor.tokenizer.pad_token_id)
    inputs.update(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
    return inputs, response_mask


def _right_padded(prompts: list[tuple[torch.Tensor, torch.Tensor]], responses: list, pad: int):
    """Rows `prompt + response`, right-padded; prompts are (ids [P] int64, mm types [P] int64)."""
    rows, types, resp_lens = [], [], []
    for (ids, typ), resp in zip(prompts, responses):
        resp = torch.as_tensor(resp, dtype=torch.long).reshape(-1)
        rows.append(torch.cat([ids, resp]))
        types.append(torch.cat([typ, torch.zeros_like(resp)]))
        resp_lens.append(resp.numel())
    length = max(r.numel() for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), pad, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    mm_types = torch.zeros((batch, length), dtype=torch.long)
    response_mask = torch.zeros((batch, length), dtype=torch.bool)
    for i, (row, typ, n_resp) in enumerate(zip(rows, types, resp_lens)):
        n = row.numel()
        input_ids[i, :n] = row
        attention_mask[i, :n] = 1
        mm_types[i, :n] = typ
        response_mask[i, n - n_resp:n] = True
    return dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_types), response_mask


def encode_groups(processor, groups: list[tuple[str, object, list]],
                  shared_prefix: bool = True) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Teacher-forcing inputs for the responses of several (prompt text, image, responses) groups.

    shared_prefix=True: one row per group, `prompt + response_1 + ... + response_n`; each response
    attends to the prompt and to itself only (`segments` tells `response_hidden` how), so the prompt
    (image tokens, problem text: most of the tokens when responses are short) runs once instead of n
    times, as Prefix Grouper (arXiv 2506.05433) does for GRPO. shared_prefix=False: one row per
    response (`prompt + response`, right-padded); kernels without custom masks (flash_attention_2)
    need this. Either way each image is processed once.

    Returns (inputs, rows_per_image). inputs: input_ids, attention_mask, mm_token_type_ids [rows, L]
    int64; pixel_values [patches, D] float32 (one copy per group); image_grid_thw [K, 3] int64;
    segments [rows, L] int64 (0 prompt, i + 1 response i of the row, -1 padding); seg_pos [rows, L]
    int64 (a token's index within its response); predict_from [N] int64 (flat index into rows x L of
    the position whose hidden state predicts each response token, response-major: response 0's tokens,
    then response 1's ...); targets [N] int64 (those tokens); response_mask [R, T] bool (response r's
    tokens, left-aligned: the layout `[N]` values unflatten into, one row per response).
    rows_per_image: the rows of each group (1 each with shared_prefix).
    """
    pad = processor.tokenizer.pad_token_id
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # ids, mm types, segments, seg_pos
    sources: list[tuple[int, torch.Tensor]] = []  # (row, positions predicting each token) per response
    responses_all: list[torch.Tensor] = []
    pixel_values, grids, rows_per_image = [], [], []
    for text, image, responses in groups:
        enc = processor(text=[text], images=[image], return_tensors="pt")
        prompt, types = enc["input_ids"][0], enc["mm_token_type_ids"][0]
        pixel_values.append(enc["pixel_values"])
        grids.append(enc["image_grid_thw"])
        resp = [torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in responses]
        responses_all.extend(resp)
        n_prompt = prompt.numel()
        if shared_prefix:
            start = n_prompt
            for r in resp:
                # token 0 is predicted from the prompt's last position, token j from the response's own j-1
                sources.append((len(rows), torch.cat([torch.tensor([n_prompt - 1]), start + torch.arange(r.numel() - 1)])
                                if r.numel() else torch.zeros(0, dtype=torch.long)))
                start += r.numel()
            rows.append((torch.cat([prompt, *resp]), torch.cat([types, *[torch.zeros_like(r) for r in resp]]),
                         torch.cat([torch.zeros(n_prompt, dtype=torch.long)] +
                                   [torch.full((r.numel(),), i + 1, dtype=torch.long) for i, r in enumerate(resp)]),
                         torch.cat([torch.zeros(n_prompt, dtype=torch.long)] + [torch.arange(r.numel()) for r in resp])))
            rows_per_image.append(1)
        else:
            for r in resp:
                sources.append((len(rows), n_prompt - 1 + torch.arange(r.numel())))
                rows.append((torch.cat([prompt, r]), torch.cat([types, torch.zeros_like(r)]),
                             torch.cat([torch.zeros(n_prompt, dtype=torch.long), torch.ones(r.numel(), dtype=torch.long)]),
                             torch.cat([torch.zeros(n_prompt, dtype=torch.long), torch.arange(r.numel())])))
            rows_per_image.append(len(resp))
    length = max(r[0].numel() for r in rows)

    def right_pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, length - t.numel()), value=value)

    inputs = {
        "input_ids": torch.stack([right_pad(r[0], pad) for r in rows]),
        "attention_mask": torch.stack([right_pad(torch.ones_like(r[0]), 0) for r in rows]),
        "mm_token_type_ids": torch.stack([right_pad(r[1], 0) for r in rows]),
        "segments": torch.stack([right_pad(r[2], -1) for r in rows]),
        "seg_pos": torch.stack([right_pad(r[3], 0) for r in rows]),
        "pixel_values": torch.cat(pixel_values),
        "image_grid_thw": torch.cat(grids),
        "predict_from": torch.cat([row * length + pos for row, pos in sources]) if sources
        else torch.zeros(0, dtype=torch.long),
        "targets": torch.cat(responses_all) if responses_all else torch.zeros(0, dtype=torch.long),
        "response_mask": response_layout([r.numel() for r in responses_all]),
    }
    return inputs, rows_per_image


def response_layout(lengths: list[int]) -> torch.Tensor:
    """[R, max(lengths)] bool: row r is True on its first lengths[r] entries (how per-token values of R
    responses, concatenated response-major, unflatten with `masked_scatter`)."""
    width = max(lengths, default=0)
    return torch.arange(width)[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]


def _vision_features(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """Merged features [tokens_k, D] of each image, from one vision-tower forward over all of them."""
    visual = model.model.visual
    out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out  # transformers 5.x: an output object
    if isinstance(feats, (tuple, list)):
        feats = torch.cat(list(feats))
    merge = visual.spatial_merge_size ** 2
    return list(torch.split(feats, (grid_thw.prod(-1) // merge).tolist()))


def _rope_index(model, inputs: dict[str, torch.Tensor], row_grids: torch.Tensor) -> torch.Tensor:
    """mrope position ids [3, R, L] for R rows, row r holding the image of grid row_grids[r]."""
    kwargs = dict(image_grid_thw=row_grids, attention_mask=inputs["attention_mask"])
    if "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:
        kwargs["mm_token_type_ids"] = inputs["mm_token_type_ids"]
    return model.model.get_rope_index(inputs["input_ids"], **kwargs)[0]


def response_hidden(model, inputs: dict[str, torch.Tensor], pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                    rows_per_image: list[int]) -> torch.Tensor:
    """Hidden states [N, D] that predict each response token of `encode_groups` inputs (response-major),
    the vision tower run once per image.

    inputs: as `encode_groups` returns them (on the model's device); pixel_values [patches, D] float of
    the K images (may require grad: the attack differentiates through it); grid_thw [K, 3] int64;
    rows_per_image: rows of each image. Each image's features are spliced into all its rows, so their
    gradients add up on the one image: the same values and gradients as the model's own forward on
    per-response copies. With shared-prefix rows the attention mask is 4D: causal, and a response sees
    the prompt and itself, never another response; each response token sits at the position it would
    have right after the prompt. The language-model head is left to the caller, which runs it on these
    N positions only (a 150k vocabulary makes [R, L, V] logits the largest tensor of a step).
    """
    ids, segments = inputs["input_ids"], inputs["segments"]
    embeds = model.get_input_embeddings()(ids)
    feats = _vision_features(model, pixel_values, grid_thw)
    image = torch.cat([f.repeat(n, 1) for f, n in zip(feats, rows_per_image)]).to(embeds.dtype)
    image_slots = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(image_slots, image)
    row_grids = torch.repeat_interleave(grid_thw, torch.tensor(rows_per_image, device=grid_thw.device), dim=0)
    prompt = segments == 0
    # the prompt's mrope positions; a response's token j goes at (the prompt's last position) + 1 + j in
    # all three sections, as text after the image does in an unpacked row
    position_ids = _rope_index(model, {**inputs, "attention_mask": prompt.long()}, row_grids)
    last = torch.where(prompt, position_ids, torch.zeros_like(position_ids)).amax(-1, keepdim=True)
    position_ids = torch.where(segments > 0, last + 1 + inputs["seg_pos"], position_ids)
    mask = inputs["attention_mask"]  # one response per row: the model's own causal mask over it
    if bool((segments > 1).any()):
        length = ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        q, k = segments[:, :, None], segments[:, None, :]
        allowed = causal & (k >= 0) & ((k == 0) | (k == q))
        # a padding position sees itself only: a query with no key at all would give NaN in sdpa
        allowed |= torch.eye(length, dtype=torch.bool, device=ids.device) & (q < 0)
        mask = allowed[:, None]  # [rows, 1, L, L] bool
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                        position_ids=position_ids).last_hidden_state
    return hidden.flatten(0, 1)[inputs["predict_from"]]
