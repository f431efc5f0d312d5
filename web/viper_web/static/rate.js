// Step 1: the example images and the user's uploads, each liked or disliked with a comment; then extraction.

import {showError} from "./errors.js";
import {toBase64} from "./rpc.js";

const RECOMMENDED = 8;

export class RatePanel {
  constructor(app) {
    this.app = app;
    this.cards = [];
    this.gallery = document.getElementById("gallery");
    this.status = document.getElementById("rate-status");
    this.extractButton = document.getElementById("extract");
    document.getElementById("recommended").textContent = String(RECOMMENDED);
    document.getElementById("upload").addEventListener("change", (event) => {
      for (const file of event.target.files) this.addCard(URL.createObjectURL(file), file.name, file, true);
      event.target.value = "";
      this.update();
    });
    this.addButton = document.getElementById("add-ratings");
    this.extractButton.addEventListener("click", () => this.extract());
    this.addButton.addEventListener("click", () => this.extract(true));
    this.update();
  }

  async loadExamples() {
    try {
      const manifest = await (await fetch("examples/examples.json")).json();
      manifest.images.forEach((name, i) => this.addCard(`examples/${name}`, `Example ${i + 1}`, null, false));
    } catch (error) {
      showError({code: "unavailable", message: `the example images did not load (${error.message})`}, "Examples");
    }
    this.update();
  }

  addCard(url, label, file, removable) {
    const card = document.createElement("figure");
    card.className = "card";
    card.dataset.rating = "";
    const img = document.createElement("img");
    img.src = url;
    img.alt = label;
    const buttons = document.createElement("div");
    buttons.className = "rating";
    const like = ratingButton("like", "♥ Like");
    const dislike = ratingButton("dislike", "✕ Dislike");
    buttons.append(like, dislike);
    const comment = document.createElement("textarea");
    comment.className = "comment";
    comment.rows = 3;
    comment.maxLength = 4000;
    comment.placeholder = "What about it? Colors, light, mood, style…";
    comment.setAttribute("aria-label", `comment on ${label}`);
    card.append(img, buttons, comment);
    const entry = {card, url, file, label, comment};
    const rate = (rating) => {
      card.dataset.rating = card.dataset.rating === rating ? "" : rating;
      like.setAttribute("aria-pressed", String(card.dataset.rating === "liked"));
      dislike.setAttribute("aria-pressed", String(card.dataset.rating === "disliked"));
      this.update();
    };
    like.addEventListener("click", () => rate("liked"));
    dislike.addEventListener("click", () => rate("disliked"));
    comment.addEventListener("input", () => this.update());
    if (removable) {
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove secondary";
      remove.textContent = "Remove";
      remove.addEventListener("click", () => {
        card.remove();
        URL.revokeObjectURL(url);
        this.cards = this.cards.filter((other) => other !== entry);
        this.update();
      });
      card.append(remove);
    }
    this.gallery.append(card);
    this.cards.push(entry);
  }

  rated() {
    return this.cards.filter((entry) => entry.card.dataset.rating);
  }

  update() {
    const rated = this.rated();
    const liked = rated.filter((entry) => entry.card.dataset.rating === "liked").length;
    const commented = rated.filter((entry) => entry.comment.value.trim()).length;
    this.status.dataset.commented = String(commented);
    this.status.textContent = `${liked} liked · ${rated.length - liked} disliked · ${commented} commented ` +
      (commented >= RECOMMENDED ? "✓" : `(at least ${RECOMMENDED} recommended)`);
    this.status.classList.toggle("warn", rated.length > 0 && commented < RECOMMENDED);
    this.extractButton.disabled = rated.length === 0 || this.busy;
    this.addButton.disabled = rated.length === 0 || this.busy;
    this.extractButton.textContent = rated.length
      ? `Extract my preferences from ${rated.length} image${rated.length === 1 ? "" : "s"}` : "Extract my preferences";
  }

  // add: AddRatings (the stored images stay, these are appended) instead of ExtractProfile (a new profile).
  async extract(add = false) {
    const userId = this.app.userId();
    if (!userId) return;
    this.busy = true;
    this.update();
    this.status.textContent = "Reading your images and comments…";
    try {
      const images = [];
      for (const entry of this.rated()) {
        const bytes = entry.file ? await entry.file.arrayBuffer() : await (await fetch(entry.url)).arrayBuffer();
        images.push({
          data: toBase64(new Uint8Array(bytes)),
          comment: entry.comment.value.trim(),
          rating: entry.card.dataset.rating === "liked" ? "RATING_LIKED" : "RATING_DISLIKED",
        });
      }
      const stored = this.app.profile.stored;
      const profile = add
        ? await this.app.client.unary("/viper.v1.ProfileService/AddRatings", {
          userId, images, expectedVersion: stored && stored.userId === userId ? stored.version : "0"})
        : await this.app.client.unary("/viper.v1.ProfileService/ExtractProfile", {userId, images});
      this.app.profile.show(profile, add ? `Added ${images.length} image(s): version ${profile.version}.`
        : "Extracted from your reactions.");
      document.getElementById("profile").scrollIntoView({behavior: "smooth"});
    } catch (error) {
      showError(error, "Extracting your preferences");
    } finally {
      this.busy = false;
      this.update();
    }
  }
}

function ratingButton(kind, text) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = kind;
  button.textContent = text;
  button.setAttribute("aria-pressed", "false");
  return button;
}
