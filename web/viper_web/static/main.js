// The ViPer page: one user at a time; the user id is remembered on this browser, the token for this tab only.

import {clearErrors, showError} from "./errors.js";
import {GeneratePanel} from "./generate.js";
import {ProfilePanel} from "./profile.js";
import {RatePanel} from "./rate.js";
import {ViperClient} from "./rpc.js";
import {ScorePanel} from "./score.js";

const USER_KEY = "viper.user";
const TOKEN_KEY = "viper.token";

class App {
  constructor() {
    this.userInput = document.getElementById("user-id");
    this.tokenInput = document.getElementById("token");
    this.userInput.value = localStorage.getItem(USER_KEY) || "";
    this.tokenInput.value = sessionStorage.getItem(TOKEN_KEY) || "";
    this.client = new ViperClient(() => this.tokenInput.value.trim());
    this.rate = new RatePanel(this);
    this.profile = new ProfilePanel(this);
    this.generate = new GeneratePanel(this);
    this.score = new ScorePanel(this);
    this.tokenInput.addEventListener("change", () => sessionStorage.setItem(TOKEN_KEY, this.tokenInput.value.trim()));
    document.getElementById("session").addEventListener("submit", (event) => {
      event.preventDefault();
      clearErrors();
      localStorage.setItem(USER_KEY, this.userInput.value.trim());
      this.profile.load();
    });
  }

  // The user id, or "" after asking for one.
  userId() {
    const userId = this.userInput.value.trim();
    if (!userId) {
      showError({code: "invalid_argument", message: "enter your user id at the top of the page first"}, "Who are you?");
      this.userInput.focus();
    }
    return userId;
  }

  async start() {
    await this.rate.loadExamples();
    if (this.userInput.value.trim()) await this.profile.load();
    document.body.dataset.ready = "true";
  }
}

new App().start();
