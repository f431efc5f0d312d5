// Step 3: generation, streamed: a progress bar per image, previews as they come, then the final images.
// Cancel aborts the HTTP request; the gateway cancels the back-end call and the server stops denoising.

import {showError} from "./errors.js";
import {pngUrl} from "./rpc.js";

export class GeneratePanel {
  constructor(app) {
    this.app = app;
    this.controller = null;
    this.form = document.getElementById("generate-form");
    this.runs = document.getElementById("runs");
    this.status = document.getElementById("generate-status");
    this.button = document.getElementById("generate-button");
    this.cancelButton = document.getElementById("cancel");
    const strength = document.getElementById("strength");
    strength.addEventListener("input", () => {
      document.getElementById("strength-value").textContent = Number(strength.value).toFixed(2);
    });
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.generate();
    });
    this.cancelButton.addEventListener("click", () => this.controller?.abort());
  }

  request() {
    const number = (id) => Number(document.getElementById(id).value) || 0;
    return {
      userId: this.app.userId(),
      prompt: document.getElementById("prompt").value.trim(),
      numImages: number("num-images"),
      seed: String(Math.max(0, Math.floor(number("seed")))),
      preferenceStrength: Number(document.getElementById("strength").value),
      width: number("width"),
      height: number("height"),
      steps: number("steps"),
      previewEvery: number("preview-every"),
      refine: document.getElementById("refine").checked,
      candidates: number("best-of"),
    };
  }

  async generate() {
    const request = this.request();
    if (!request.userId) return;
    this.controller = new AbortController();
    this.button.disabled = true;
    this.cancelButton.disabled = false;
    const row = document.createElement("div");
    row.className = "run-row";
    this.runs.prepend(row);
    try {
      const seeds = await this.run(request, row);
      if (document.getElementById("compare").checked && seeds.length) {
        // The same seeds without the profile: the difference is the personalization alone.
        await this.run({...request, preferenceStrength: 0, seed: seeds[0], candidates: 0}, row);
      }
      this.status.textContent = "Done.";
    } catch (error) {
      if (error.code === "canceled") {
        this.status.textContent = "Cancelled.";
      } else {
        this.status.textContent = "Failed.";
        showError(error, "Generating");
      }
    } finally {
      this.controller = null;
      this.button.disabled = false;
      this.cancelButton.disabled = true;
    }
  }

  // One Generate call; returns the seeds of its images.
  async run(request, row) {
    const run = document.createElement("div");
    run.className = "run";
    run.dataset.state = "running";
    const count = Math.min(Math.max(request.numImages || 1, 1), 8);
    // Best of N: progress covers every candidate, then the best `count` arrive, best first, with their scores.
    const candidates = request.candidates > count ? request.candidates : 0;
    const candidateSteps = new Array(candidates).fill(0);
    const imageSteps = new Array(count).fill(0); // a request's images denoise side by side: progress interleaves
    run.dataset.label = `strength ${request.preferenceStrength.toFixed(2)}` +
      (candidates ? ` · best of ${candidates}` : "");
    const title = document.createElement("h3");
    title.textContent = `“${request.prompt || "…"}” · ${run.dataset.label}` +
      (request.seed !== "0" ? ` · seed ${request.seed}` : "");
    const tiles = document.createElement("div");
    tiles.className = "tiles";
    run.append(title, tiles);
    row.append(run);
    const tileList = Array.from({length: count}, (_, i) => tile(i));
    tiles.append(...tileList.map((t) => t.root));
    this.status.textContent = "Waiting for the server…";
    const seeds = [];
    let answered = false;
    try {
      for await (const event of this.app.client.stream("/viper.v1.GenerationService/Generate", request,
        {signal: this.controller.signal})) {
        answered = true;
        const data = event.progress || event.preview || event.image;
        if (candidates && event.progress) {
          this.showCandidates(tileList, candidateSteps, data);
          continue;
        }
        const t = tileList[data.imageIndex || 0];
        if (!t || (candidates && event.preview)) continue;
        if (event.progress) {
          t.bar.max = data.totalSteps || 1;
          t.bar.value = data.step || 0;
          t.caption.textContent = `step ${data.step || 0} of ${data.totalSteps}`;
          if (t.root.dataset.state !== "running") t.root.dataset.state = "running";
          imageSteps[data.imageIndex || 0] = data.step || 0;
          const done = imageSteps.reduce((sum, steps) => sum + steps, 0);
          this.status.textContent = count > 1 ? `${count} images: step ${done} of ${count * data.totalSteps}` :
            `Step ${data.step || 0} of ${data.totalSteps}`;
        } else if (event.preview) {
          t.img.src = pngUrl(data.png);
          t.img.dataset.kind = "preview";
          t.img.hidden = false;
        } else {
          t.img.src = pngUrl(data.png);
          t.img.dataset.kind = "final";
          t.img.hidden = false;
          t.bar.value = t.bar.max;
          t.root.dataset.state = "done";
          t.caption.textContent = `seed ${data.seed} · ${data.width}×${data.height} · profile v${data.profileVersion}`;
          if (data.score !== undefined) {
            t.root.dataset.score = String(data.score);
            t.caption.textContent += ` · score ${data.score.toFixed(4)}` +
              (candidates ? ` (#${(data.imageIndex || 0) + 1} of ${candidates})` : "");
          }
          t.download.href = t.img.src;
          t.download.download = `viper-${data.seed}.png`;
          t.download.hidden = false;
          seeds.push(data.seed);
        }
      }
      run.dataset.state = "done";
    } catch (error) {
      if (!answered && error.code !== "canceled") {
        run.remove(); // refused outright: the error message says why, an empty run would only add noise
        if (!row.children.length) row.remove();
        throw error;
      }
      run.dataset.state = error.code === "canceled" ? "cancelled" : "failed";
      for (const t of tileList) {
        if (t.root.dataset.state !== "done") {
          t.root.dataset.state = run.dataset.state;
          t.caption.textContent = error.code === "canceled" ? "cancelled" : "failed";
        }
      }
      throw error;
    }
    return seeds;
  }

  // A candidate's progress: every tile waiting for a pick shows the steps of all candidates together.
  showCandidates(tileList, candidateSteps, data) {
    const index = data.imageIndex || 0;
    candidateSteps[index] = data.step || 0;
    const total = data.totalSteps || 1;
    const done = candidateSteps.reduce((sum, steps) => sum + steps, 0);
    for (const t of tileList) {
      t.bar.max = total * candidateSteps.length;
      t.bar.value = done;
      t.caption.textContent = `${candidateSteps.length} candidates: step ${done} of ${t.bar.max}`;
      if (t.root.dataset.state !== "running") t.root.dataset.state = "running";
    }
    this.status.textContent = `${candidateSteps.length} candidates: step ${done} of ${total * candidateSteps.length}`;
  }
}

function tile(index) {
  const root = document.createElement("figure");
  root.className = "tile";
  root.dataset.index = String(index);
  root.dataset.state = "waiting";
  const img = document.createElement("img");
  img.alt = `generated image ${index + 1}`;
  img.hidden = true;
  const bar = document.createElement("progress");
  bar.max = 1;
  bar.value = 0;
  const caption = document.createElement("figcaption");
  caption.textContent = "waiting";
  const download = document.createElement("a");
  download.textContent = "download";
  download.hidden = true;
  root.append(img, bar, caption, download);
  return {root, img, bar, caption, download};
}
