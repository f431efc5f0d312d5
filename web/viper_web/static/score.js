// Step 4: dropped images ranked by the user's predicted preference, as the scores stream in.

import {showError} from "./errors.js";
import {toBase64} from "./rpc.js";

export class ScorePanel {
  constructor(app) {
    this.app = app;
    this.items = [];
    this.ranking = document.getElementById("ranking");
    this.status = document.getElementById("score-status");
    const zone = document.getElementById("drop-zone");
    const input = document.getElementById("score-files");
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      this.score([...event.dataTransfer.files].filter((file) => file.type.startsWith("image/")));
    });
    input.addEventListener("change", () => {
      this.score([...input.files]);
      input.value = "";
    });
    document.getElementById("clear-scores").addEventListener("click", () => {
      for (const item of this.items) URL.revokeObjectURL(item.url);
      this.items = [];
      this.render();
      this.status.textContent = "";
    });
  }

  async score(files) {
    const userId = this.app.userId();
    if (!userId || !files.length) return;
    const batch = files.map((file) => ({name: file.name, url: URL.createObjectURL(file), score: null}));
    this.items.push(...batch);
    this.render();
    this.status.textContent = `Scoring ${files.length} image${files.length === 1 ? "" : "s"}…`;
    try {
      const queries = [];
      for (const file of files) queries.push(toBase64(new Uint8Array(await file.arrayBuffer())));
      for await (const result of this.app.client.stream("/viper.v1.MetricService/Score", {userId, queries})) {
        batch[result.index || 0].score = result.score;
        this.render();
      }
      this.status.textContent = "Scored.";
    } catch (error) {
      this.items = this.items.filter((item) => !batch.includes(item) || item.score !== null);
      this.render();
      this.status.textContent = "";
      showError(error, "Scoring");
    }
  }

  render() {
    const ranked = [...this.items].sort((a, b) => (b.score ?? -1) - (a.score ?? -1));
    this.ranking.replaceChildren(...ranked.map((item) => {
      const row = document.createElement("li");
      row.className = "ranked";
      row.dataset.name = item.name;
      if (item.score !== null) row.dataset.score = String(item.score);
      const img = document.createElement("img");
      img.src = item.url;
      img.alt = item.name;
      const label = document.createElement("span");
      label.className = "name";
      label.textContent = item.name;
      const meter = document.createElement("meter");
      meter.min = 0;
      meter.max = 1;
      meter.value = item.score ?? 0;
      const value = document.createElement("span");
      value.className = "score";
      value.textContent = item.score === null ? "scoring…" : `${(item.score * 100).toFixed(1)}%`;
      row.append(img, label, meter, value);
      return row;
    }));
  }
}
