// The ViPer page: one user at a time; the user id is remembered on this browser, the token for this tab only.
// The page signs in with an end user's JWT (never a service token): its subject is the user id, and the server
// lets it act on that user's profile only. `#token=<JWT>` in the address signs in too (make web prints one);
// the token is taken out of the address at once.

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
    this.tokenInput.value = tokenFromAddress() || sessionStorage.getItem(TOKEN_KEY) || "";
    this.client = new ViperClient(() => this.tokenInput.value.trim());
    this.signIn();
    this.rate = new RatePanel(this);
    this.profile = new ProfilePanel(this);
    this.generate = new GeneratePanel(this);
    this.score = new ScorePanel(this);
    this.tokenInput.addEventListener("change", () => {
      clearErrors();
      this.signIn();
      if (this.userInput.value.trim()) this.profile.load();
    });
    document.getElementById("session").addEventListener("submit", (event) => {
      event.preventDefault();
      clearErrors();
      localStorage.setItem(USER_KEY, this.userInput.value.trim());
      this.profile.load();
    });
  }

  // Takes the token's subject as the user id; refuses what is not a JWT (a service token has no place in a page).
  signIn() {
    const token = this.tokenInput.value.trim();
    this.userInput.readOnly = false;
    if (!token) {
      sessionStorage.removeItem(TOKEN_KEY);
      return;
    }
    const subject = jwtSubject(token);
    if (subject === null) {
      this.tokenInput.value = "";
      sessionStorage.removeItem(TOKEN_KEY);
      showError({code: "unauthenticated", message: "this page signs in with an end user's token (a JWT from your " +
        "identity provider), never a service token"}, "Not a sign-in token");
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    this.userInput.value = subject;
    this.userInput.readOnly = true;
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

// The JWT's `sub` (not verified here: the server verifies every call), or null for anything but a JWT.
function jwtSubject(token) {
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const claims = JSON.parse(atob(parts[1].replace(/-/g, "+").replace(/_/g, "/")));
    return typeof claims.sub === "string" && claims.sub ? claims.sub : null;
  } catch {
    return null;
  }
}

// A token handed over in the address (#token=...), removed from it so it is not bookmarked or shared.
function tokenFromAddress() {
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (token) history.replaceState(null, "", location.pathname + location.search);
  return token;
}

new App().start();
