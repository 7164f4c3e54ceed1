"""A slow, literal CaR: the official computation order, written from the spec, sharing no engine code.

What it does the way the official code does (spec sections 1-4), and the engine does not:
- the proposal CLIP's trunk runs again at every step (and once per sentence in referring mode);
- foreground text features are encoded again at every step, each class on its own, over all 77 tokens;
- Grad-CAM runs one forward of the last block and one backward per query, with weight gradients
  (parameters require grad, the model is zero_grad'ed before each backward), through forward hooks and
  tensor hooks on the last block's ln_1, then numpy on the CPU;
- the CLIP-ES transition matrix is rebuilt (Sinkhorn, symmetrise, square) for every query;
- visual prompts are drawn per query with cv2 on numpy arrays, preprocessed with PIL;
- the classifier encodes every prompted image once per template and every template's texts every step.

`compat` picks which engine mode it stands for. `fixed` (default) applies the project's fixes (spec
section 9, README "Deviations"): the CRF sees the plain RGB image, a survivor whose CRF mask is empty is
dropped (score 0), position embeddings stay in the model's precision. `official` keeps the official
quirks: position embeddings stored as fp16 (both CLIPs, every call), the CRF fed the BGR-minus-mean image
cast to uint8, and `F.one_hot` of the CRF labels without a class count, zipped with the survivors (so
trailing survivors that win no pixel are dropped, and in referring mode the masks shift). In both, referring
prompt lists are filtered as lists and the loop stops at `max_steps`.
The only engine module it imports is the presets' constants (allowed by the test plan).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from car_backend.engine.presets import CAM_TEMPLATE, Preset

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
EPS = 1e-15


@dataclass
class LiteralResult:
    kept: list[str]
    scores: np.ndarray  # (Q,)
    masks: np.ndarray  # (Q, H, W) bool
    steps: int
    label_map: np.ndarray  # (H, W)


class LiteralCaR:
    def __init__(self, proposal_model, proposal_tokenizer, classifier_model, classifier_tokenizer, preset: Preset,
                 max_steps: int = 10, compat: str = "fixed"):
        self.proposal_model = proposal_model.eval()
        self.proposal_tokenizer = proposal_tokenizer
        self.classifier_model = classifier_model.eval()
        self.classifier_tokenizer = classifier_tokenizer
        self.preset = preset
        self.max_steps = max_steps
        self.official = compat == "official"
        self._background_features = None  # the official CLIPCAM encodes these once, at construction
        reference = next(proposal_model.parameters())
        self.device, self.dtype = reference.device, reference.dtype

    # -------------------------------------------------------------------------------------------- the loop
    def segment(self, rgb: np.ndarray, queries: list[str], mode: str = "semantic") -> LiteralResult:
        image = Image.fromarray(rgb)
        clip_text = [CAM_TEMPLATE.format(q) for q in queries]
        cam_text = list(queries)
        if self.preset.templates is None:
            prompt_lists = [list(clip_text)]
        else:
            prompt_lists = [[t.format(q) for q in queries] for t in self.preset.templates]
        positions = list(range(len(queries)))  # original index of each current text
        kept_last = 0
        steps = 0
        previous = None
        while True:
            steps += 1
            proposals = self.mask_proposals(image, cam_text, mode)
            prompted = [self.visual_prompt(rgb, p) for p in proposals]
            scores = np.diagonal(self.classify(prompted, prompt_lists))
            kept = [i for i, s in enumerate(scores) if s > self.preset.confidence_threshold]
            if not kept:
                kept = [int(np.argmax(scores))]
            if proposals.max() == 0 and previous is not None:
                prev_props, prev_positions = previous
                proposals = prev_props[[prev_positions.index(p) for p in positions]]
            previous = (proposals, positions)
            if len(kept) == kept_last or steps >= self.max_steps:
                break
            kept_last = len(kept)
            cam_text = [clip_text[positions[i]] for i in kept]
            prompt_lists = [[lst[i] for i in kept] for lst in prompt_lists]
            positions = [positions[i] for i in kept]

        final_scores = np.zeros(len(queries), dtype=np.float32)
        masks = np.zeros((len(queries),) + rgb.shape[:2], dtype=bool)
        refined = self.crf(rgb, proposals[kept], separate=mode == "referring")
        # zip() stops at the shorter: officially the one-hot may have fewer rows than there are survivors
        for i, mask in zip(kept, refined, strict=False):
            if not self.official and not mask.any():
                continue  # fixed: a survivor that wins no CRF pixel is dropped
            final_scores[positions[i]] = scores[i]
            masks[positions[i]] = mask
        if mode == "referring":
            weights = final_scores / final_scores.sum()
            merged = (weights[:, None, None] * masks).sum(0) >= 0.5
            if merged.sum() <= 0.05 * merged.size:
                merged = masks.any(0)
            label_map = merged.astype(np.int32)
        else:
            label_map = np.zeros(rgb.shape[:2], dtype=np.int32)
            for i in sorted(range(len(queries)), key=lambda j: final_scores[j]):
                if final_scores[i] > 0:
                    label_map[masks[i] > 0.5] = i + 1
        kept_names = [q for q, s in zip(queries, final_scores, strict=True) if s > 0]
        return LiteralResult(kept_names, final_scores, masks, steps, label_map)

    # -------------------------------------------------------------------------------------------- proposals
    def mask_proposals(self, image: Image.Image, texts: list[str], mode: str) -> np.ndarray:
        if mode == "referring":
            return np.concatenate([self.clip_cam(image, [t]) for t in texts])
        return self.clip_cam(image, texts)

    def encode_text_per_class(self, model, tokenizer, texts: list[str]) -> torch.Tensor:
        rows = []
        with torch.no_grad():
            for text in texts:
                feature = model.encode_text(tokenizer([text]).to(self.device))
                feature = feature / feature.norm(dim=-1, keepdim=True)
                feature = feature.mean(dim=0)
                rows.append(feature / feature.norm())
        return torch.stack(rows)

    def clip_cam(self, image: Image.Image, texts: list[str]) -> np.ndarray:
        model = self.proposal_model
        width, height = image.size
        h16 = int(np.ceil(height / 16) * 16)
        w16 = int(np.ceil(width / 16) * 16)
        array = np.asarray(image.resize((w16, h16), Image.BICUBIC), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(((array - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1).copy())[None]
        tensor = tensor.to(self.device, self.dtype)
        features, attentions = self.encode_image_wrapper(tensor, h16, w16)
        if self._background_features is None:
            self._background_features = self.encode_text_per_class(
                model, self.proposal_tokenizer, [CAM_TEMPLATE.format(w) for w in self.preset.background])
        fg = self.encode_text_per_class(model, self.proposal_tokenizer, texts)
        all_texts = torch.cat([fg, self._background_features])
        grid_h, grid_w = h16 // 16, w16 // 16
        refined_maps = []
        attention = None
        for idx in range(len(texts)):
            cam, last_attention = self.grad_cam(features, all_texts, idx, grid_h, grid_w)
            if cam.max() == 0:
                cam, last_attention = self.grad_cam(features, fg, idx, grid_h, grid_w)
            if idx == 0:
                stacked = torch.stack([a[:, 1:, 1:] for a in attentions + [last_attention]])[-8:]
                attention = stacked.mean(0)[0].detach().float().cpu()
            boxes = self.boxes(cam, self.preset.clipes_threshold)
            aff_mask = torch.zeros((grid_h, grid_w))
            for x0, y0, x1, y1 in boxes:
                aff_mask[y0:y1, x0:x1] = 1
            aff_mask = aff_mask.view(1, -1)
            trans = attention / attention.sum(dim=0, keepdim=True)
            trans = trans / trans.sum(dim=1, keepdim=True)
            for _ in range(2):
                trans = trans / trans.sum(dim=0, keepdim=True)
                trans = trans / trans.sum(dim=1, keepdim=True)
            trans = (trans + trans.T) / 2
            trans = trans @ trans
            trans = trans * aff_mask
            refined = (trans @ torch.from_numpy(cam).reshape(-1, 1)).reshape(grid_h, grid_w).numpy()
            refined = refined - refined.min()
            refined = refined / (EPS + refined.max())
            refined_maps.append(cv2.resize(refined.astype(np.float32), (width, height)))
        return np.stack(refined_maps)

    def encode_image_wrapper(self, tensor: torch.Tensor, h: int, w: int):
        """Trunk: patch embedding, upsampled positions, ln_pre, blocks 1..L-1 with attention, no grad."""
        visual = self.proposal_model.visual
        with torch.no_grad():
            pos = self.upsample_positions(visual.positional_embedding, (h // 16, w // 16))
            x = visual.conv1(tensor)
            x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
            zeros = torch.zeros(1, 1, x.shape[-1], device=x.device, dtype=x.dtype)
            x = torch.cat([visual.class_embedding + zeros, x], dim=1) + pos.to(x.dtype)
            x = visual.ln_pre(x)
            attentions = []
            for block in visual.transformer.resblocks[:-1]:
                y = block.ln_1(x)
                out, weights = block.attn(y, y, y, need_weights=True)
                x = x + block.ls_1(out)
                x = x + block.ls_2(block.mlp(block.ln_2(x)))
                attentions.append(weights)
        return x, attentions

    def upsample_positions(self, pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Bilinear resize of the patch positions (CLS kept); officially then stored as half."""
        side = int(np.sqrt(pos.shape[0] - 1))
        patches = pos[1:].T.reshape(1, -1, side, side)
        patches = F.interpolate(patches, size=grid, mode="bilinear")
        pos = torch.cat([pos[:1], patches.reshape(pos.shape[1], -1).T])
        return pos.half() if self.official else pos

    def grad_cam(self, features, texts, idx, grid_h, grid_w):
        model = self.proposal_model
        visual = model.visual
        block = visual.transformer.resblocks[-1]
        store = {}

        def keep_activation(module, inputs, output):
            store["activation"] = output.detach().float().cpu()
            output.register_hook(lambda grad: store.__setitem__("gradient", grad.detach().float().cpu()))

        for p in model.parameters():
            p.requires_grad_(True)
        handle = block.ln_1.register_forward_hook(keep_activation)
        try:
            y = block.ln_1(features)
            out, last_attention = block.attn(y, y, y, need_weights=True)
            x = features + block.ls_1(out)
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
            x = visual.ln_post(x)
            x = x[:, 1:, :].mean(dim=1) @ visual.proj
            x = x / x.norm(dim=1, keepdim=True)
            t = (texts / texts.norm(dim=1, keepdim=True)).to(x.dtype)
            probs = F.softmax((model.logit_scale.exp() * x @ t.T).float(), dim=-1)
            model.zero_grad()
            probs[:, idx].sum().backward(retain_graph=True)
        finally:
            handle.remove()
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = None
        activation = store["activation"][:, 1:, :].reshape(1, grid_h, grid_w, -1).permute(0, 3, 1, 2).numpy()
        gradient = store["gradient"][:, 1:, :].reshape(1, grid_h, grid_w, -1).permute(0, 3, 1, 2).numpy()
        weights = gradient.mean(axis=(2, 3))
        cam = (weights[:, :, None, None] * activation).sum(axis=1)
        cam = np.maximum(cam, 0).astype(np.float32)
        cam = self.scale(cam[0])  # per layer
        cam = self.scale(np.maximum(cam, 0))  # after aggregating the single layer
        return cam, last_attention.detach()

    @staticmethod
    def scale(cam: np.ndarray) -> np.ndarray:
        cam = cam - np.min(cam)
        return (cam / (EPS + np.max(cam))).astype(np.float32)

    @staticmethod
    def boxes(cam: np.ndarray, threshold: float) -> list[tuple[int, int, int, int]]:
        height, width = cam.shape
        gray = np.expand_dims((cam * 255).astype(np.uint8), 2)
        while True:
            _, binary = cv2.threshold(gray, int(threshold * np.max(gray)), 255, cv2.THRESH_BINARY)
            if binary.max() > 0 or threshold <= 0:
                break
            threshold -= 0.1
        contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
        if not contours:
            return [(0, 0, 0, 0)]
        boxes = []
        for contour in contours:
            x, y, w, h = cv2.boundingRect(contour)
            boxes.append((x, y, min(x + w, width - 1), min(y + h, height - 1)))
        return boxes

    # -------------------------------------------------------------------------------------------- classifier
    def visual_prompt(self, rgb: np.ndarray, proposal: np.ndarray) -> Image.Image:
        if proposal.sum() <= 1:
            return Image.fromarray(rgb)
        mask = (proposal > self.preset.mask_threshold).astype(np.uint8)
        if not mask.any():
            return Image.fromarray(rgb)
        prompts = self.preset.visual_prompts
        out = rgb.copy()
        inv = (1 - mask)[:, :, None]
        if "blur" in prompts:
            blurred = cv2.GaussianBlur(out.copy(), (15, 15), 0)
            out = cv2.add(cv2.bitwise_and(out, out, mask=mask), (blurred * inv).astype(np.uint8))
        if "gray" in prompts:
            gray = cv2.cvtColor(out.copy(), cv2.COLOR_BGR2GRAY)
            gray = np.stack([gray, gray, gray], axis=-1)
            out = cv2.add(cv2.bitwise_and(out, out, mask=mask), (gray * inv).astype(np.uint8))
        if "black" in prompts:
            out = cv2.bitwise_and(out, out, mask=mask)
        if "circle" in prompts or "rectangle" in prompts:
            rows, cols = np.where(mask == 1)
            cy, cx = int(np.mean(rows)), int(np.mean(cols))
            h = rows.max() - rows.min() + 1
            w = cols.max() - cols.min() + 1
            if "circle" in prompts:
                out = cv2.ellipse(out, (cx, cy), (w // 2, h // 2), 0, 0, 360, (255, 0, 0), 1)
            if "rectangle" in prompts:
                out = cv2.rectangle(out, (cx - w // 2, cy - h // 2), (cx + w // 2, cy + h // 2), (255, 0, 0), 1)
        if "contour" in prompts:
            filled = self.fill_holes(mask)
            contours, _ = cv2.findContours(filled, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
            out = cv2.drawContours(out.copy(), contours, -1, (255, 0, 0), 1)
        return Image.fromarray(out.astype(np.uint8))

    @staticmethod
    def fill_holes(mask: np.ndarray) -> np.ndarray:
        """Background components (4-connected) that do not touch the border become foreground."""
        count, labels = cv2.connectedComponents((mask == 0).astype(np.uint8), connectivity=4)
        border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
        filled = mask.astype(bool).copy()
        for label in range(1, count):
            if label not in border:
                filled |= labels == label
        return filled.astype(np.uint8)

    def preprocess_224(self, image: Image.Image) -> torch.Tensor:
        size = self.classifier_model.visual.image_size
        size = size[0] if isinstance(size, tuple) else size
        width, height = image.size
        if width <= height:
            new_w, new_h = size, int(size * height / width)
        else:
            new_w, new_h = int(size * width / height), size
        resized = image.resize((new_w, new_h), Image.BICUBIC)
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        cropped = resized.crop((left, top, left + size, top + size))
        array = np.asarray(cropped, dtype=np.float32) / 255.0
        return torch.from_numpy(((array - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1).copy())

    def classify(self, prompted: list[Image.Image], prompt_lists: list[list[str]]) -> np.ndarray:
        batch = torch.stack([self.preprocess_224(p) for p in prompted]).to(self.device, self.dtype)
        per_template = [self.forward_clip_single(batch, texts).cpu() for texts in prompt_lists]
        if self.preset.templates is None:
            return per_template[0].numpy()
        return F.softmax(torch.stack(per_template).sum(0), dim=-1).numpy()

    def forward_clip_single(self, batch: torch.Tensor, texts: list[str]) -> torch.Tensor:
        model = self.classifier_model
        visual = model.visual
        with torch.no_grad():
            text_features = model.encode_text(self.classifier_tokenizer(texts).to(self.device))
            x = visual.conv1(batch)
            x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
            zeros = torch.zeros(x.shape[0], 1, x.shape[-1], device=x.device, dtype=x.dtype)
            x = torch.cat([visual.class_embedding + zeros, x], dim=1)
            side = int(np.sqrt(visual.positional_embedding.shape[0] - 1))
            x = visual.ln_pre(x + self.upsample_positions(visual.positional_embedding, (side, side)).to(x.dtype))
            for block in visual.transformer.resblocks[:-1]:
                y = block.ln_1(x)
                out, _ = block.attn(y, y, y, need_weights=True)
                x = x + block.ls_1(out)
                x = x + block.ls_2(block.mlp(block.ln_2(x)))
            image_features = visual.ln_post(x[:, 0]) @ visual.proj
            image_features = image_features / image_features.norm(dim=1, keepdim=True)
            text_features = text_features / text_features.norm(dim=1, keepdim=True)
            return F.softmax((model.logit_scale.exp() * image_features @ text_features.T).float(), dim=-1)

    # -------------------------------------------------------------------------------------------- CRF
    def crf(self, rgb: np.ndarray, cams: np.ndarray, separate: bool) -> np.ndarray:
        from pydensecrf import densecrf, utils

        if self.official:
            shifted = rgb[:, :, ::-1].astype(np.float32) - np.array((104.008, 116.669, 122.675), np.float32)
            image = np.ascontiguousarray(shifted.astype(np.uint8))
        else:
            image = np.ascontiguousarray(rgb)

        def apply(probabilities: np.ndarray) -> np.ndarray:
            c, h, w = probabilities.shape
            d = densecrf.DenseCRF2D(w, h, c)
            d.setUnaryEnergy(np.ascontiguousarray(utils.unary_from_softmax(probabilities)))
            d.addPairwiseGaussian(sxy=1, compat=3)
            d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=image, compat=4)
            labels = np.argmax(np.array(d.inference(10)).reshape((c, h, w)), axis=0)
            if self.official:  # one_hot without num_classes: as many rows as the largest label present
                return F.one_hot(torch.from_numpy(labels).long()).permute(2, 0, 1)[1:].numpy().astype(bool)
            return np.eye(c, dtype=bool)[labels].transpose(2, 0, 1)[1:]

        if separate:
            return np.concatenate([apply(np.concatenate([1 - cam[None], cam[None]])) for cam in cams])
        background = 1 - np.max(cams, axis=0, keepdims=True)
        return apply(np.concatenate([background, cams]))
