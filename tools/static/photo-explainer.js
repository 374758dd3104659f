// The Introduction's photo explainer: the reader's own image, explained in the browser, with no kernel.
//
// EfficientNet-Lite0's feature extractor runs in ONNX Runtime Web (exported at build time by
// tools/explainer_model.py); everything after it is a global average pooling and one linear layer, so GradCAM,
// Linear Approximation and XGradCAM under each target follow in closed form from the activations A, the weights W
// and the bias b (nbs/04_cam.ipynb, Eq. eq-pooled-head): g = c W^T w for the target's weights w and scale c, then
// map = sum_k g_k rho_k A_k / (h w). contrastive_explanations.methods.cam.pooled_head_maps is the same in Python.
(function () {
  "use strict";
  const STATIC = new URL(".", document.currentScript.src);  // the book's _static/ folder
  const TARGETS = ["original", "weighted", "mean", "max"];
  const METHODS = {gradcam: "GradCAM", linear_approximation: "Linear Approximation", xgradcam: "XGradCAM"};
  const TOP = 5;  // classes offered

  // ---- the model: features in ONNX Runtime Web, the head's weights beside them --------------------------------
  async function loadModel() {
    const ort = await import(new URL("ort/ort.wasm.min.mjs", STATIC).href);
    ort.env.wasm.wasmPaths = new URL("ort/", STATIC).href;
    ort.env.wasm.numThreads = 1;  // threads need a cross-origin-isolated page, which a static book is not
    const url = (name) => new URL("explainer/" + name, STATIC).href;
    const [session, head, meta] = await Promise.all([
      ort.InferenceSession.create(url("features.onnx"), {executionProviders: ["wasm"]}),
      fetch(url("head.bin")).then((r) => r.arrayBuffer()),
      fetch(url("meta.json")).then((r) => r.json())]);
    const C = meta.classes.length, K = meta.channels;
    const all = new Float32Array(head);
    const W = all.subarray(0, C * K), b = all.subarray(C * K, C * K + C);
    const colSum = new Float64Array(K);  // sum_s W_s, for the mean target
    for (let c = 0; c < C; c++) for (let k = 0; k < K; k++) colSum[k] += W[c * K + k];
    return {ort, session, meta, W, b, C, K, colSum};
  }

  async function features(model, pixels) {  // pixels: Float32Array (3, S, S) in [0, 1], channel-major
    const S = model.meta.crop;
    const out = await model.session.run({pixels: new model.ort.Tensor("float32", pixels, [1, 3, S, S])});
    return out.features.data;  // (K, h, w), channel-major
  }

  // ---- the closed form of Eq. eq-pooled-head -------------------------------------------------------------------
  function logitsOf(model, A) {
    const {W, b, C, K} = model, P = A.length / K;
    const pooled = new Float64Array(K);
    for (let k = 0; k < K; k++) { let s = 0; for (let p = 0; p < P; p++) s += A[k * P + p]; pooled[k] = s / P; }
    const y = new Float64Array(C);
    for (let c = 0; c < C; c++) { let s = b[c]; for (let k = 0; k < K; k++) s += W[c * K + k] * pooled[k]; y[c] = s; }
    return y;
  }

  const softplus = (x) => (x > 0 ? x + Math.log1p(Math.exp(-x)) : Math.log1p(Math.exp(x)));

  function channelWeights(model, y, t, target) {  // g = c W^T w (Float64Array K) for one class and one target
    const {W, C, K, colSum} = model, g = new Float64Array(K);
    const row = (c, f) => { for (let k = 0; k < K; k++) g[k] += f * W[c * K + k]; };
    if (target === "original") row(t, 1);
    else if (target === "mean") { row(t, C / (C - 1)); for (let k = 0; k < K; k++) g[k] -= colSum[k] / (C - 1); }
    else if (target === "max") {
      let r = -1;
      for (let c = 0; c < C; c++) if (c !== t && (r < 0 || y[c] > y[r])) r = c;
      row(t, 1); row(r, -1);
    } else {  // weighted: w = e_t - alpha (softmax of the others), scale p_t (1 - p_t) = sigmoid(-L) sigmoid(L)
      let m = -Infinity;
      for (let c = 0; c < C; c++) if (c !== t) m = Math.max(m, y[c]);
      let z = 0;
      for (let c = 0; c < C; c++) if (c !== t) z += Math.exp(y[c] - m);
      const L = m + Math.log(z) - y[t];  // the rival margin, logsumexp of the others minus y_t
      const scale = Math.exp(-softplus(L)) * Math.exp(L - softplus(L));
      row(t, scale);
      for (let c = 0; c < C; c++) if (c !== t) row(c, -scale * Math.exp(y[c] - m) / z);
    }
    return g;
  }

  function maps(model, A, y, t, method) {  // {target: Float64Array (h w)} for class t
    const K = model.K, P = A.length / K, rho = new Float64Array(K).fill(1);
    if (method === "xgradcam") {
      for (let k = 0; k < K; k++) {
        let s = 0, n = 0;
        for (let p = 0; p < P; p++) { s += A[k * P + p]; n += Math.abs(A[k * P + p]); }
        rho[k] = n > 0 ? s / n : 0;
      }
    }
    const result = {};
    for (const target of TARGETS) {
      const g = channelWeights(model, y, t, target), m = new Float64Array(P);
      for (let k = 0; k < K; k++) {
        const f = g[k] * rho[k] / P;
        if (f !== 0) for (let p = 0; p < P; p++) m[p] += f * A[k * P + p];
      }
      result[target] = m;
    }
    return result;
  }

  function softmax(y) {
    const m = Math.max(...y), e = y.map((v) => Math.exp(v - m)), z = e.reduce((a, v) => a + v, 0);
    return e.map((v) => v / z);
  }

  // ---- the model's preprocessing: short side to `resize`, centre crop `crop`, pixels in [0, 1] -----------------
  const pyRound = (x) => { const r = Math.round(x); return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r; };

  function preprocess(bitmap, meta) {
    const {width, height} = bitmap, R = meta.resize, S = meta.crop;
    const short = Math.min(width, height), long = Math.max(width, height);
    const longSide = Math.floor(R * long / short);  // as torchvision's Resize computes the long side
    const w = width <= height ? R : longSide, h = width <= height ? longSide : R;
    const canvas = document.createElement("canvas");
    canvas.width = S; canvas.height = S;
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";  // the browser's resampling, not torchvision's bicubic with antialiasing
    const left = pyRound((w - S) / 2), top = pyRound((h - S) / 2);
    ctx.drawImage(bitmap, -left, -top, w, h);
    const rgba = ctx.getImageData(0, 0, S, S).data, pixels = new Float32Array(3 * S * S);
    for (let i = 0; i < S * S; i++) for (let c = 0; c < 3; c++) pixels[c * S * S + i] = rgba[4 * i + c] / 255;
    return pixels;
  }

  // ---- drawing: the map upsampled bilinearly (align_corners=False) over the image, bwr, symmetric scale --------
  function upsample(m, h, w, S) {
    const out = new Float64Array(S * S);
    const src = (o, n) => Math.min(Math.max((o + 0.5) * n / S - 0.5, 0), n - 1);
    for (let i = 0; i < S; i++) {
      const y = src(i, h), y0 = Math.floor(y), y1 = Math.min(y0 + 1, h - 1), fy = y - y0;
      for (let j = 0; j < S; j++) {
        const x = src(j, w), x0 = Math.floor(x), x1 = Math.min(x0 + 1, w - 1), fx = x - x0;
        out[i * S + j] = (1 - fy) * ((1 - fx) * m[y0 * w + x0] + fx * m[y0 * w + x1])
                       + fy * ((1 - fx) * m[y1 * w + x0] + fx * m[y1 * w + x1]);
      }
    }
    return out;
  }

  const bwr = (v) => (v < 0 ? [1 + v, 1 + v, 1] : [1, 1 - v, 1 - v]);  // v in [-1, 1]: blue, white, red

  function drawOverlay(canvas, pixels, up, S, half) {
    const ctx = canvas.getContext("2d"), img = ctx.createImageData(S, S);
    for (let i = 0; i < S * S; i++) {
      const [r, g, b] = bwr(half > 0 ? Math.max(-1, Math.min(1, up[i] / half)) : 0);
      img.data[4 * i] = 255 * (0.5 * pixels[i] + 0.5 * r);
      img.data[4 * i + 1] = 255 * (0.5 * pixels[S * S + i] + 0.5 * g);
      img.data[4 * i + 2] = 255 * (0.5 * pixels[2 * S * S + i] + 0.5 * b);
      img.data[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }

  function drawImage(canvas, pixels, S) {
    const ctx = canvas.getContext("2d"), img = ctx.createImageData(S, S);
    for (let i = 0; i < S * S; i++) {
      for (let c = 0; c < 3; c++) img.data[4 * i + c] = 255 * pixels[c * S * S + i];
      img.data[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }

  function drawColourBar(canvas) {
    const ctx = canvas.getContext("2d"), n = canvas.width;
    for (let x = 0; x < n; x++) {
      const [r, g, b] = bwr(2 * x / (n - 1) - 1);
      ctx.fillStyle = `rgb(${255 * r}, ${255 * g}, ${255 * b})`;
      ctx.fillRect(x, 0, 1, canvas.height);
    }
  }

  // ---- the widget ------------------------------------------------------------------------------------------------
  function el(tag, attrs = {}, children = []) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) (k === "text" ? (e.textContent = v) : e.setAttribute(k, v));
    for (const c of children) e.append(c);
    return e;
  }

  function mount(root, ready) {
    root.textContent = "";
    const file = el("input", {type: "file", accept: "image/*", "aria-label": "an image file"});
    const method = el("select", {"aria-label": "method"},
                      Object.entries(METHODS).map(([v, t]) => el("option", {value: v, text: t})));
    const klass = el("select", {"aria-label": "class", disabled: ""});
    const status = el("div", {class: "pe-status", role: "status"});
    const panels = ["your image", ...TARGETS].map((name) => {
      const canvas = el("canvas", {width: 224, height: 224});
      const caption = el("figcaption", {text: name});
      return {name, canvas, caption, figure: el("figure", {}, [canvas, caption])};
    });
    const bar = el("canvas", {width: 224, height: 12, class: "pe-bar"});
    const barLabels = el("div", {class: "pe-bar-labels"}, [el("span", {text: "against"}), el("span", {text: "0"}),
                                                            el("span", {text: "for"})]);
    const legend = el("p", {class: "pe-legend", text: "Red: evidence for the class under that objective; blue: " +
      "evidence against it. Each map has its own symmetric scale, so compare patterns, not shades across maps."});
    root.append(el("div", {class: "pe-controls"}, [el("label", {text: "Image "}, [file]),
                                                  el("label", {text: " Method "}, [method]),
                                                  el("label", {text: " Class "}, [klass])]),
                status, el("div", {class: "pe-grid"}, panels.map((p) => p.figure)),
                el("div", {class: "pe-scale"}, [bar, barLabels]), legend);
    drawColourBar(bar);
    const state = {pixels: null, A: null, y: null, p: null};
    const setStatus = (s, text) => { root.dataset.state = s; status.textContent = text; };
    setStatus("loading", "loading the model (once, from this book)…");

    function render() {
      const model = api.model, S = model.meta.crop, [h, w] = model.meta.grid;
      const t = Number(klass.value), result = maps(model, state.A, state.y, t, method.value);
      drawImage(panels[0].canvas, state.pixels, S);
      for (const panel of panels.slice(1)) {
        const up = upsample(result[panel.name], h, w, S);
        const half = up.reduce((a, v) => Math.max(a, Math.abs(v)), 0);
        drawOverlay(panel.canvas, state.pixels, up, S, half);
        panel.caption.textContent = `${panel.name} (±${half.toPrecision(2)})`;
      }
      api.last = {logits: Array.from(state.y), class: t, method: method.value,
                  maps: Object.fromEntries(TARGETS.map((n) => [n, Array.from(result[n])]))};
      setStatus("done", `${METHODS[method.value]}, ${model.meta.classes[t]} (p = ${state.p[t].toFixed(3)})`);
    }

    async function explainPixels(pixels) {
      setStatus("busy", "computing…");
      await new Promise((r) => setTimeout(r, 0));  // let the page show it
      const model = await ready;
      state.pixels = pixels;
      state.A = await features(model, pixels);
      state.y = logitsOf(model, state.A);
      state.p = softmax(Array.from(state.y));
      const top = Array.from(state.p.keys()).sort((a, b) => state.p[b] - state.p[a]).slice(0, TOP);
      klass.replaceChildren(...top.map((c) => el("option", {value: String(c),
        text: `${model.meta.classes[c]} (${state.p[c].toFixed(3)})`})));
      klass.disabled = false;
      render();
      return api.last;
    }

    async function explainFile(f) {
      setStatus("busy", "computing…");
      let bitmap;
      try {
        bitmap = await createImageBitmap(f);
      } catch (err) {
        setStatus("error", `This browser cannot decode ${f.name || "that file"} as an image: choose a JPEG, PNG ` +
                           "or WebP file.");
        return null;
      }
      const model = await ready;
      return explainPixels(preprocess(bitmap, model.meta));
    }

    const guard = (f) => async (...args) => {
      try { return await f(...args); } catch (err) { setStatus("error", `Something failed: ${err.message || err}`); }
      return null;
    };
    file.addEventListener("change", guard(() => file.files.length && explainFile(file.files[0])));
    method.addEventListener("change", guard(() => state.A && render()));
    klass.addEventListener("change", guard(() => state.A && render()));
    root.addEventListener("dragover", (e) => e.preventDefault());
    root.addEventListener("drop", guard((e) => {
      e.preventDefault();
      return e.dataTransfer.files.length && explainFile(e.dataTransfer.files[0]);
    }));
    const api = {ready, model: null, last: null, explainPixels: guard(explainPixels), explainFile: guard(explainFile)};
    ready.then((model) => { api.model = model; setStatus("ready", "choose or drop an image"); },
               (err) => setStatus("error", "The model could not be loaded (" + (err.message || err) + "): this " +
                                  "explainer needs the book's offline assets, built by `make book` with npm."));
    return api;
  }

  function start() {
    const root = document.querySelector(".photo-explainer");
    if (root) window.photoExplainer = mount(root, loadModel());
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
