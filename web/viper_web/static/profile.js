// Step 2: the stored profile, its liked and disliked features as chips to edit, saved with UpdateProfile.
// The save names the version it edited: if the profile changed meanwhile, the server refuses (ABORTED)
// and the page offers to reload it.

import {showError} from "./errors.js";

export class ProfilePanel {
  constructor(app) {
    this.app = app;
    this.stored = null; // the profile as the server last returned it
    this.lists = {liked: [], disliked: []}; // the features as edited here
    this.meta = document.getElementById("profile-meta");
    this.body = document.getElementById("profile-body");
    this.status = document.getElementById("profile-status");
    this.saveButton = document.getElementById("save-profile");
    this.revertButton = document.getElementById("revert-profile");
    this.conflict = document.getElementById("conflict");
    this.saveButton.addEventListener("click", () => this.save());
    this.revertButton.addEventListener("click", () => this.render());
    document.getElementById("reload-profile").addEventListener("click", () => this.load());
    for (const kind of ["liked", "disliked"]) {
      const input = document.getElementById(`add-${kind}`);
      input.addEventListener("keydown", (event) => {
        if (event.key !== "Enter") return;
        event.preventDefault();
        const text = input.value.trim();
        if (text && !this.lists[kind].includes(text)) this.lists[kind].push(text);
        input.value = "";
        this.renderChips();
      });
    }
  }

  async load() {
    const userId = this.app.userId();
    if (!userId) return;
    this.meta.textContent = `Loading ${userId}'s profile…`;
    try {
      const profile = await this.app.client.unary("/viper.v1.ProfileService/GetProfile", {userId});
      this.show(profile, "Loaded.");
    } catch (error) {
      this.stored = null;
      this.body.hidden = true;
      if (error.code === "not_found") {
        this.meta.textContent = `No profile for ${userId} yet: react to images above, then extract your preferences.`;
      } else {
        this.meta.textContent = "No profile loaded.";
        showError(error, "Loading your profile");
      }
    }
  }

  show(profile, note) {
    this.stored = profile;
    this.render();
    this.status.textContent = note;
    this.loadHistory();
  }

  // The kept versions, newest first, each (but the current one) with a Restore button.
  async loadHistory() {
    const list = document.getElementById("history");
    const current = this.stored;
    try {
      const page = await this.app.client.unary("/viper.v1.ProfileService/ListProfileVersions",
        {userId: current.userId, pageSize: 20});
      list.replaceChildren(...(page.versions || []).map((version) => this.historyItem(version, current)));
    } catch (error) {
      list.replaceChildren();
      if (error.code !== "permission_denied") showError(error, "Loading your profile's history");
    }
  }

  historyItem(version, current) {
    const item = document.createElement("li");
    item.dataset.version = version.version;
    const when = version.updateTime ? new Date(version.updateTime).toLocaleString() : "";
    const change = (version.change || "PROFILE_CHANGE_UNSPECIFIED").replace("PROFILE_CHANGE_", "").toLowerCase();
    const text = document.createElement("span");
    text.textContent = `version ${version.version} · ${change === "unspecified" ? "saved" : change} · ${when} · ` +
      `${version.likedImageCount} liked, ${version.dislikedImageCount} disliked images · ` +
      `liked: ${(version.likedFeatures || []).join(", ") || "(none)"}`;
    item.append(text);
    if (version.version !== current.version) {
      const restore = document.createElement("button");
      restore.type = "button";
      restore.className = "secondary restore";
      restore.textContent = "Restore";
      restore.addEventListener("click", () => this.restore(version.version, current.version));
      item.append(restore);
    }
    return item;
  }

  async restore(version, expectedVersion) {
    this.status.textContent = `Restoring version ${version}…`;
    try {
      const profile = await this.app.client.unary("/viper.v1.ProfileService/RestoreProfileVersion",
        {userId: this.stored.userId, version, expectedVersion});
      this.show(profile, `Restored version ${version} as version ${profile.version}.`);
    } catch (error) {
      this.status.textContent = "Not restored";
      showError(error, "Restoring a version");
    }
  }

  // Back to the stored profile, dropping local edits.
  render() {
    const profile = this.stored;
    this.lists = {liked: [...profile.likedFeatures], disliked: [...profile.dislikedFeatures]};
    this.conflict.hidden = true;
    this.body.hidden = false;
    const updated = profile.updateTime ? new Date(profile.updateTime).toLocaleString() : "";
    this.meta.textContent = `${profile.userId} · version ${profile.version} · from ${profile.likedImageCount} liked ` +
      `and ${profile.dislikedImageCount} disliked images · ${profile.extractorModel} · updated ${updated}`;
    this.meta.dataset.version = profile.version;
    this.status.textContent = "";
    this.renderChips();
  }

  dirty() {
    const same = (a, b) => a.length === b.length && a.every((value, i) => value === b[i]);
    return this.stored && !(same(this.lists.liked, this.stored.likedFeatures) &&
      same(this.lists.disliked, this.stored.dislikedFeatures));
  }

  renderChips() {
    for (const kind of ["liked", "disliked"]) {
      const list = document.getElementById(`${kind}-chips`);
      list.replaceChildren(...this.lists[kind].map((feature, i) => this.chip(kind, i, feature)));
    }
    const dirty = this.dirty();
    this.saveButton.disabled = !dirty;
    this.revertButton.disabled = !dirty;
    if (dirty) this.status.textContent = "Unsaved changes";
  }

  chip(kind, index, feature) {
    const item = document.createElement("li");
    item.className = "chip";
    const text = document.createElement("button");
    text.type = "button";
    text.className = "chip-text";
    text.textContent = feature;
    text.title = "click to edit";
    text.addEventListener("click", () => this.edit(item, kind, index));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "chip-remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `remove ${feature}`);
    remove.addEventListener("click", () => {
      this.lists[kind].splice(index, 1);
      this.renderChips();
    });
    item.append(text, remove);
    return item;
  }

  edit(item, kind, index) {
    const input = document.createElement("input");
    input.className = "chip-input";
    input.value = this.lists[kind][index];
    input.maxLength = 200;
    let done = false;
    const commit = (keep) => {
      if (done) return;
      done = true;
      const text = input.value.trim();
      if (keep && text) this.lists[kind][index] = text;
      else if (keep) this.lists[kind].splice(index, 1);
      this.renderChips();
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") {
        event.preventDefault();
        commit(true);
      } else if (event.key === "Escape") {
        commit(false);
      }
    });
    input.addEventListener("blur", () => commit(true));
    item.replaceChildren(input);
    input.focus();
    input.select();
  }

  async save() {
    const edited = this.stored;
    this.saveButton.disabled = true;
    this.status.textContent = "Saving…";
    try {
      const profile = await this.app.client.unary("/viper.v1.ProfileService/UpdateProfile", {
        userId: edited.userId,
        likedFeatures: this.lists.liked,
        dislikedFeatures: this.lists.disliked,
        expectedVersion: edited.version,
      });
      this.show(profile, `Saved as version ${profile.version}.`);
    } catch (error) {
      this.saveButton.disabled = false;
      if (error.code === "aborted") {
        this.status.textContent = "Not saved";
        this.conflict.hidden = false;
        document.getElementById("conflict-message").textContent =
          `Not saved: this profile changed after you loaded version ${edited.version} (${error.message}). ` +
          "Reload it to see the stored features, then make your edits again.";
      } else {
        this.status.textContent = "Not saved";
        showError(error, "Saving your profile");
      }
    }
  }
}
