"""A contrast set written by this project: benign requests on the topics of every harm category.

    python -m clsalign_jax.data.contrast --out=clsalign_jax/data/shipped/contrast/prompts.jsonl

Why: the CLS trained on mixture v2 learned *topic*, not *intent*. No benign training prompt touches a
harm topic (curation even drops benign prompts that carry a safety phrase), so "which household
cleaners should never be mixed?" looks malicious. This module writes benign prompts on the same topics
as the malicious sources' categories (weapons, drugs, cybercrime, fraud, violence, self-harm, hate,
sexual content, privacy, misinformation, terrorism, theft, child safety, hazardous chemicals), from
benign angles: history, safety and prevention, fiction, protection, medicine and first aid, law and
policy, education, research and journalism, and words whose everyday sense is harmless ("kill a
process", "beat egg whites", "steal second base").

Every prompt is one hand-written topic item (`TOPICS`, written for this module, not taken from any
dataset) put into one template (`CORE_TEMPLATES`), and about half of them then into one of curation's
rewrite frames (`curation.REWRITES`, "Please answer this question: ...", "Here is my request: ..."):
the malicious side of mixture v2 opens that way as often, so the contrast prompts cannot be told apart
by their first words (`form_only_check`). All choices are made by hashes of the item, so the output is
deterministic.

Overlap check (`build_contrast_prompts`): a prompt is dropped when it equals (normalised) or nearly
equals (`near_duplicates`: content-word Jaccard >= `NEAR_DUP_THRESHOLD` with >= `MIN_SHARED_WORDS` words
in common) a prompt of any evaluation set the project ships (`curation.evaluation_prompts()` plus
DeepInception's behaviours), equals a prompt of mixture v2 or nearly copies one of its malicious prompts
(`LABEL_CONFLICT_THRESHOLD`: one request, two labels), or nearly equals another contrast prompt.
"""

from __future__ import annotations

import collections
import hashlib
import json
import pathlib
import re
from collections.abc import Sequence

import numpy as np
from absl import flags
from scipy import sparse

from clsalign_jax import cli
from clsalign_jax.data import curation
from clsalign_jax.data.records import BENIGN, MALICIOUS, normalize_prompt

SOURCE = "contrast"
SHIPPED_FILE = curation.SHIPPED_DIR / "contrast" / "prompts.jsonl"
DEEPINCEPTION_FILE = curation.EVAL_SHIPPED_DIR / "deepinception" / "data_main.json"
# Near-duplicate = content-word Jaccard >= 0.5 and >= 3 shared content words (`near_duplicates`).
# Measured on this set (SOURCE.md): paraphrases of JailbreakBench's benign twins that keep the twin's
# content words score 0.55-1.0; the generated prompts' closest evaluation prompts (0.40-0.43) share a
# topic but ask something else ("a carbon monoxide leak in my house" / "a water leak in my house").
# 0.5 sits between the two, one step below the 0.6 often used for near-duplicate text, because here a
# miss (training on an evaluation prompt) costs more than a drop.
NEAR_DUP_THRESHOLD = 0.5
MIN_SHARED_WORDS = 3
# Against mixture v2's malicious prompts the risk is one request carrying both labels, not a leak:
# a benign prompt on the same topic with the opposite intent ("the legal position of someone who
# unknowingly buys stolen goods" vs "How do I buy stolen goods?", 0.5) is the contrast this set
# exists for, so only a near-copy of the request (0.7: at most one content word in ~4 differs) drops.
LABEL_CONFLICT_THRESHOLD = 0.7
# Share of prompts put into a curation rewrite frame: mixture v2's malicious side has ~60 % rewritten
# prompts, some of them in frames ("Explain how I can ...") that read like natural openings.
FRAME_SHARE = 0.55

# The harm categories of the malicious sources (CatQA's "Area/Subarea", Do-Not-Answer's risk areas,
# DangerousQA's one category) and the topic words of curation's refusal map, each with the contrast
# areas that hold benign prompts on its topics; `areas_of` takes the first key found in a category.
CATEGORY_AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
  ("human trafficking", ("violence", "child_safety")),
  ("gender-based violence", ("violence",)),
  ("intellectual property", ("theft_robbery",)),
  ("identity", ("fraud_scams", "privacy_surveillance")),
  ("data theft", ("privacy_surveillance", "cybercrime_malware")),
  ("terror", ("terrorism_extremism",)),
  ("self-harm", ("self_harm",)),
  ("child", ("child_safety",)),
  ("drug", ("drugs",)),
  ("weapon", ("weapons_explosives",)),
  ("hazardous", ("hazardous_chemicals",)),
  ("unsafe practices", ("hazardous_chemicals", "drugs")),
  ("assault", ("violence",)),
  ("physical", ("violence", "self_harm")),
  ("theft", ("theft_robbery",)),
  ("cybercrime", ("cybercrime_malware",)),
  ("malware", ("cybercrime_malware",)),
  ("ransomware", ("cybercrime_malware",)),
  ("spyware", ("cybercrime_malware", "privacy_surveillance")),
  ("phishing", ("fraud_scams", "cybercrime_malware")),
  ("scam", ("fraud_scams",)),
  ("counterfeit", ("fraud_scams",)),
  ("fraud", ("fraud_scams",)),
  ("false advertising", ("fraud_scams",)),
  ("economic", ("fraud_scams",)),
  ("financial", ("fraud_scams",)),
  ("doxx", ("privacy_surveillance",)),
  ("deepfake", ("privacy_surveillance", "misinformation_elections")),
  ("surveillance", ("privacy_surveillance",)),
  ("tracking", ("privacy_surveillance",)),
  ("privacy", ("privacy_surveillance",)),
  ("information_hazard", ("privacy_surveillance",)),
  ("sexual", ("sexual_content",)),
  ("adult", ("sexual_content",)),
  # Do-Not-Answer's "discrimination_exclusion_toxicity_hateful_offensive" holds its sexual requests too.
  ("discrimination", ("hate_harassment", "sexual_content")),
  ("hate", ("hate_harassment",)),
  ("harass", ("hate_harassment",)),
  ("cyberbullying", ("hate_harassment",)),
  ("misinformation", ("misinformation_elections",)),
  ("political", ("misinformation_elections",)),
  ("malicious_uses", ("cybercrime_malware", "fraud_scams", "drugs", "terrorism_extremism", "privacy_surveillance")),
  (
    "dangerousqa",
    (
      "violence",
      "weapons_explosives",
      "hate_harassment",
      "theft_robbery",
      "cybercrime_malware",
      "privacy_surveillance",
    ),
  ),
  ("illegal", ("theft_robbery", "drugs", "weapons_explosives")),
)


def areas_of(category: str) -> tuple[str, ...]:
  """The contrast areas answering a malicious source's category (() when none is known)."""
  cat = category.casefold()
  return next((areas for key, areas in CATEGORY_AREAS if key in cat), ())


ANGLES = (
  "history",
  "safety",
  "protection",
  "medicine",
  "law_policy",
  "education",
  "research",
  "fiction",
  "harmless_sense",
)

# ----- topics ---------------------------------------------------------------------------------------
# Items by harm area and angle. Prefix "v:" = a first-person how-to verb phrase ("How can I ...?"),
# "n:" = a noun phrase ("Describe ..."), "s:" = a story premise ("Write a short story about ...").
# Every item asks for something a careful assistant answers: history, prevention, protection, care,
# law, understanding at the level of a newspaper or a textbook, fiction without instructions.

TOPICS: dict[str, dict[str, tuple[str, ...]]] = {
  "weapons_explosives": {
    "history": (
      "n:the invention of gunpowder in Song dynasty China",
      "n:the role of the English longbow at the Battle of Agincourt",
      "n:the impact of the Maxim gun on nineteenth-century colonial wars",
      "n:Alfred Nobel's invention of dynamite and the founding of the Nobel Prize",
      "n:the 1917 Halifax harbour explosion and the relief effort that followed",
      "n:the craftsmanship of the Japanese katana",
      "n:the naval arms race between Britain and Germany before the First World War",
      "n:the campaign that led to the 1997 treaty banning anti-personnel landmines",
      "n:the siege engines of medieval Europe, such as the trebuchet",
    ),
    "safety": (
      "v:store a hunting rifle safely in a house with young children",
      "v:celebrate the Fourth of July without getting hurt by fireworks",
      "v:report an old artillery shell I found while hiking",
      "n:the basic rules of firearm safety taught in hunter education courses",
      "v:keep my dog calm during neighbourhood fireworks",
      "n:the right response to finding unexploded wartime ordnance on a beach",
      "v:transport an inherited rifle safely to a licensed dealer for appraisal",
      "v:teach my teenager gun safety before his first hunting trip",
    ),
    "protection": (
      "v:find a reputable self-defence class for beginners",
      "n:the protection levels of police body armour",
      "n:how schools run lockdown drills without frightening young children",
    ),
    "medicine": (
      "n:first aid for a gunshot wound while waiting for an ambulance",
      "v:help someone whose hand was injured by a firework until paramedics arrive",
      "n:how trauma surgeons treat blast injuries",
      "n:hearing protection for people who practise at a shooting range",
    ),
    "law_policy": (
      "n:how background checks for gun purchases work in the United States",
      "n:the changes to Australian gun laws after 1996",
      "v:sell an antique sword collection I inherited legally",
      "n:the Arms Trade Treaty and what it regulates",
      "n:the airline rules for packing kitchen knives when moving house",
      "n:how gun buyback programmes work",
    ),
    "education": (
      "n:how bomb-disposal robots are used by police",
      "n:why landmines remain dangerous decades after a war ends",
      "n:how airport scanners detect prohibited items in luggage",
      "n:the training of sniffer dogs for police bomb squads",
    ),
    "research": (
      "n:the debate over what the 1994 US assault weapons ban achieved",
      "n:how public health researchers collect data on firearm injuries",
      "v:find reliable data on global arms exports for a journalism project",
    ),
    "fiction": (
      "s:a retired bomb-disposal technician who teaches her grandson to fish",
      "s:a blacksmith in a fantasy village who refuses to forge swords for a tyrant",
      "s:a war veteran learning to live with the sound of fireworks",
      "s:a museum curator restoring a medieval suit of armour",
      "s:two rival archers at a village fair who become friends",
      "s:an old cannon that a seaside village turns into a flower planter",
    ),
    "harmless_sense": (
      "v:shoot portraits in harsh midday sunlight",
      "v:improve my aim at an archery club",
      "v:get more headshots in a first-person shooter video game",
      "v:blow up a small photo to poster size without losing quality",
      "n:the origin of the phrase 'bite the bullet'",
      "v:make bath bombs with citric acid and baking soda",
      "v:sharpen a kitchen knife with a whetstone",
      "v:fire a pottery kiln for the first time",
      "v:trigger a GitHub Actions workflow manually",
      "n:the 'nuclear option' in US Senate procedure",
      "v:set off a chain reaction in a Rube Goldberg machine for a science fair",
      "n:the unwritten rules of calling 'shotgun' for the front seat",
      "v:load a film camera without exposing the roll",
      "v:aim a telescope at Saturn",
      "v:throw darts more accurately",
    ),
  },
  "drugs": {
    "history": (
      "n:the Opium Wars between Britain and China",
      "n:alcohol Prohibition in the United States and why it ended",
      "n:how aspirin was developed from willow bark",
      "n:the role of aggressive painkiller marketing in the US opioid epidemic",
      "n:the traditional use of coca leaves in the Andes",
      "n:the origins of the 'war on drugs' in the 1970s",
      "n:the thalidomide tragedy and how it changed drug regulation",
    ),
    "safety": (
      "v:talk to my teenager about the risks of vaping",
      "v:recognise the signs that a friend may be addicted to painkillers",
      "v:dispose of leftover prescription opioids after surgery",
      "v:keep medicines out of reach of toddlers",
      "n:the dangers of mixing alcohol with sleeping pills",
      "v:support my brother through alcohol withdrawal and know when he needs a doctor",
      "v:recognise the signs of alcohol poisoning at a party",
      "v:help my elderly father keep track of his medications safely",
    ),
    "protection": (
      "v:protect my drink from being spiked at a bar",
      "v:help a friend who seems to have been drugged at a party",
    ),
    "medicine": (
      "n:how naloxone reverses an opioid overdose",
      "n:the signs of an opioid overdose and how bystanders should respond",
      "n:how methadone and buprenorphine are used to treat opioid addiction",
      "n:how caffeine affects the brain",
      "v:read the dosage chart on a children's fever medicine",
      "n:the reasons not to take someone else's prescription medication",
      "n:the interactions between grapefruit juice and some prescription drugs",
      "v:deal with caffeine withdrawal headaches after quitting coffee",
      "n:the risks of taking too much ibuprofen",
      "n:how nicotine patches help people quit smoking",
      "v:quit smoking with the help of my doctor",
    ),
    "law_policy": (
      "n:the differences between cannabis laws in Canada and the Netherlands",
      "v:travel abroad with my prescription ADHD medication legally",
      "n:the system the DEA uses to schedule controlled substances",
      "n:the results of Portugal's 2001 drug decriminalisation",
      "n:the rules for drug testing in the workplace",
    ),
    "education": (
      "v:prepare a drug-awareness talk for a middle school class",
      "n:how addiction changes the brain's reward system",
      "n:the difference between physical dependence and addiction",
    ),
    "research": (
      "n:how clinical trials test psilocybin as a treatment for depression",
      "v:find statistics on overdose deaths in my state for a news article",
      "n:the reasons fentanyl has made the overdose crisis more deadly",
      "n:the evidence on supervised consumption sites",
    ),
    "fiction": (
      "s:a nurse working the night shift in a rehab clinic",
      "s:a teenager who helps his older brother through recovery from addiction",
      "s:a detective who breaks up a bootlegging ring in Prohibition-era Chicago",
      "s:a small-town pharmacist who notices that a regular customer is struggling",
      "s:a family rebuilding trust after a father's first year of sobriety",
      "s:a former smuggler turned fisherman who helps the coast guard",
    ),
    "harmless_sense": (
      "v:weed my vegetable garden without using chemicals",
      "v:pot up tomato seedlings into bigger containers",
      "v:make a strong pot of coffee in a French press",
      "v:cut a dovetail joint by hand",
      "v:speed up my slow laptop",
      "n:the purpose of a 'dope sheet' in animation",
      "v:grow basil in a pot on a windowsill",
      "v:fix a cracked phone screen",
      "v:dose liquid fertiliser correctly for houseplants",
      "v:get a runner's high without overtraining",
      "v:brew kombucha at home safely",
    ),
  },
  "cybercrime_malware": {
    "history": (
      "n:the Morris worm of 1988 and what it taught the early internet",
      "n:how a researcher's kill switch slowed the WannaCry outbreak",
      "n:how codebreakers at Bletchley Park broke the Enigma cipher",
      "n:the Stuxnet incident and its significance for cyberwarfare",
      "n:the history of 'phone phreaking' in the 1970s",
      "n:the ILOVEYOU email virus of 2000 and its clean-up",
    ),
    "protection": (
      "v:protect my home Wi-Fi network from intruders",
      "v:set up two-factor authentication on my email account",
      "v:tell whether my laptop has been infected with malware",
      "v:back up my files so that ransomware can't destroy them",
      "v:choose a password manager for my family",
      "v:secure a small business website against common attacks",
      "v:remove adware that keeps opening pop-ups in my browser",
      "v:check whether my email address was exposed in a data breach",
      "v:recover my social media account after someone else took it over",
      "v:keep my router's firmware up to date",
      "v:lock down my kids' accounts on a shared family computer",
      "v:spot a fake login page before I type my password",
      "v:wipe my old phone securely before selling it",
    ),
    "medicine": ("n:the security of connected medical devices such as insulin pumps",),
    "law_policy": (
      "n:the Computer Fraud and Abuse Act and why security researchers criticise it",
      "v:report a security vulnerability I found in a company's app responsibly",
      "n:the duties a company has under the GDPR after a data breach",
      "n:the Budapest Convention on cybercrime",
    ),
    "education": (
      "n:penetration testing and why companies pay for it",
      "n:the difference between a virus, a worm and a trojan",
      "n:how bug bounty programmes reward security researchers",
      "n:the OWASP Top 10 list of web application risks",
      "n:the meaning of 'zero-day vulnerability'",
      "v:start a career in cybersecurity as a self-taught programmer",
      "v:prepare for a capture-the-flag competition at my university",
      "n:the ways antivirus software recognises malicious programs",
      "n:the way public-key cryptography keeps online shopping safe",
      "n:the job a firewall does on a home network",
    ),
    "research": (
      "n:how researchers measure how quickly companies patch known vulnerabilities",
      "n:the economics of the ransomware business model, as described by security reporters",
    ),
    "fiction": (
      "s:a teenage coder who wins a hackathon with an app for her grandmother",
      "s:a security analyst racing to restore a hospital's systems after a cyberattack",
      "s:an AI that learns to protect a small town's power grid",
      "s:a retired codebreaker who teaches cryptography puzzles to schoolchildren",
    ),
    "harmless_sense": (
      "v:kill a frozen process in Linux",
      "v:execute a Python script from the command line",
      "n:the meaning of 'attack surface' in software design",
      "v:exploit a weak back rank in a chess game",
      "v:hack together a quick prototype during a hackathon weekend",
      "v:crack a walnut without a nutcracker",
      "n:the purpose of a dead man's switch on a train",
      "v:terminate a hung Windows service from the command prompt",
      "v:inject dependencies in a Spring Boot application",
      "v:fix a SQL query that returns duplicate rows",
      "v:use a brute-force search to solve a sudoku in Python",
      "v:reap zombie processes in a Unix program",
      "n:the role of daemons in Unix systems",
      "v:deworm a new puppy",
      "v:force-quit an app that has stopped responding on a Mac",
      "v:fork a repository on GitHub and open a pull request",
      "v:spawn worker threads in Node.js",
    ),
  },
  "fraud_scams": {
    "history": (
      "n:Charles Ponzi's 1920 scheme and how it collapsed",
      "n:how the Madoff fraud was finally uncovered",
      "n:the South Sea Bubble of 1720",
      "n:the forged Hitler diaries scandal of 1983",
      "n:tulip mania in the Dutch Golden Age",
      "n:the story of Frank Abagnale and how much of it was exaggerated",
      "n:the Wirecard accounting scandal",
    ),
    "protection": (
      "v:recognise a phishing email that pretends to be from my bank",
      "v:protect my grandmother from phone scams",
      "v:spot a fake online store before I buy anything",
      "v:check whether a job offer I got by text message is a scam",
      "v:freeze my credit after my wallet was stolen",
      "v:tell whether someone I met on a dating app might be a romance scammer",
      "v:verify that a charity is legitimate before donating",
      "v:check the security features of a banknote to see if it is genuine",
      "v:avoid rental listing scams when looking for an apartment",
      "v:spot fake reviews when shopping online",
      "v:identify counterfeit sneakers before buying them second-hand",
      "v:check whether a cryptocurrency investment offer is a scam",
      "v:protect my phone number from SIM swap fraud",
      "v:recognise a fake invoice sent to my small business",
      "v:tell a genuine tech support call from a scam",
    ),
    "law_policy": (
      "n:the steps to take after becoming a victim of identity theft",
      "v:report an investment scam to the authorities",
      "n:how false advertising laws protect consumers",
      "n:the reasons insider trading is illegal",
      "n:how securities regulators detect pump-and-dump schemes",
      "n:the consumer protections for online purchases in the EU",
      "v:dispute a fraudulent charge on my credit card",
    ),
    "education": (
      "n:the psychological tricks scammers use to create a false sense of urgency",
      "n:how chip cards make card cloning harder",
      "v:teach my students to recognise online scams",
      "n:the warning signs of a pyramid scheme",
      "v:build an emergency fund on a modest salary",
      "n:the difference between a Roth IRA and a traditional IRA",
      "v:pay off credit card debt faster",
      "n:how banks detect unusual transactions",
      "v:teach my teenager how compound interest works",
    ),
    "research": (
      "v:fact-check a viral crowdfunding campaign before sharing it",
      "n:the research on why scammers target older adults",
      "n:the methods investigative reporters use to follow the money in corruption cases",
    ),
    "fiction": (
      "s:an elderly man who outsmarts a phone scammer",
      "s:a bank teller who notices something odd about a customer's withdrawals",
      "s:a con artist in 1920s Paris who is tricked by his own mark",
      "s:a fraud investigator who finds a forgotten family fortune",
      "s:a grandmother who runs a neighbourhood workshop on spotting scams",
    ),
    "harmless_sense": (
      "v:forge a simple steel hook as a beginner blacksmith",
      "v:fake a bokeh effect in photo editing software",
      "v:use mock objects in Python unit tests",
      "v:write a spoof of a famous Shakespeare sonnet",
      "v:generate fake test data for a database with the Faker library",
      "n:the meaning of 'fake it till you make it'",
      "v:pull off a convincing bluff in a friendly poker game",
      "n:the 'bait and switch' trope in mystery novels",
      "v:clone my own voice to narrate my audiobook",
      "v:fake a tan with self-tanning lotion without streaks",
    ),
  },
  "violence": {
    "history": (
      "n:the causes of the First World War",
      "n:the history of the women's shelter movement",
      "n:the international response to the Rwandan genocide",
      "n:the movement that ended the transatlantic slave trade",
      "n:the history of duelling and why it was banned",
      "n:gladiator fights in ancient Rome",
      "n:the Battle of Hastings",
      "n:the Christmas truce of 1914",
      "n:Gandhi's Salt March and nonviolent resistance",
    ),
    "safety": (
      "v:de-escalate a heated argument between two coworkers",
      "v:stay safe when walking home alone at night",
      "v:help a friend who is in an abusive relationship",
      "n:the warning signs of domestic violence",
      "v:make a safety plan for leaving an abusive partner",
      "n:the signs that someone may be a victim of human trafficking",
      "v:step in safely if I see someone being harassed on a train",
      "v:teach my kids to handle a bully without fighting",
      "v:stay safe if a protest near my home turns violent",
      "v:calm down when I'm so angry that I want to hit something",
    ),
    "protection": (
      "v:choose between Krav Maga and Brazilian jiu-jitsu for self-defence",
      "v:get a restraining order against a violent ex-partner",
    ),
    "medicine": (
      "v:stop heavy bleeding from a deep cut until the ambulance arrives",
      "n:the signs of a concussion after a fall",
      "v:support a survivor of assault in getting medical care",
      "n:how emergency departments care for survivors of sexual assault",
      "n:how trauma-informed therapy helps survivors of violence",
      "v:treat a black eye",
    ),
    "law_policy": (
      "n:the legal difference between assault and battery",
      "n:the difference between 'stand your ground' laws and a duty to retreat",
      "n:how the Violence Against Women Act supports survivors",
      "n:the process of pressing charges after an assault",
      "n:the work of the International Criminal Court",
    ),
    "education": (
      "v:run a bystander-intervention workshop at my college",
      "n:the methods hotel staff are trained to use to spot human trafficking",
      "v:teach conflict resolution skills to primary school pupils",
    ),
    "research": (
      "n:the research on violent video games and aggression",
      "n:the explanations criminologists give for the drop in violent crime in the 1990s",
      "n:how violence interrupter programmes reduce shootings",
    ),
    "fiction": (
      "s:a boxer preparing for his last fight",
      "s:a detective solving a murder in a snowed-in mountain hotel",
      "s:a woman rebuilding her life after leaving an abusive marriage",
      "s:two knights who settle their feud without drawing their swords",
      "s:a paramedic's longest night in a busy city",
      "s:a war correspondent coming home after twenty years",
      "s:a sheriff in the Old West who never fires his gun",
    ),
    "harmless_sense": (
      "v:beat egg whites until they form stiff peaks",
      "v:tackle safely in youth rugby",
      "v:butcher a whole chicken into eight pieces",
      "v:punch down bread dough after the first rise",
      "v:knock down a non-load-bearing wall during a renovation",
      "v:hit a golf ball farther off the tee",
      "v:choke up on a baseball bat",
      "n:the knockout stage of the football World Cup",
      "v:smash garlic with the flat of a knife",
      "v:kill weeds growing in the cracks of my patio",
      "v:land a clean hit in a fencing bout",
      "v:kick a football with more power",
      "v:whip cream by hand",
    ),
  },
  "self_harm": {
    "history": (
      "n:the history of suicide prevention hotlines",
      "n:the creation of the 988 crisis line in the United States",
      "n:the decriminalisation of suicide in England in 1961",
      "n:the history of the Samaritans in Britain",
    ),
    "safety": (
      "v:support a friend who told me they have been cutting themselves",
      "v:talk with a friend who says they no longer want to live",
      "v:find a crisis helpline in my country",
      "n:the warning signs that a teenager may be thinking about suicide",
      "v:make my home safer for a family member in a mental health crisis",
      "v:cope with the urge to self-harm when I feel overwhelmed",
      "v:write a personal safety plan together with my therapist",
      "v:check in on a coworker who seems withdrawn and hopeless",
      "v:help my teenage daughter who has started restricting food",
      "v:support my partner after a suicide attempt",
      "n:the steps to take if someone says they have a plan to end their life",
      "v:get through the night when I feel hopeless",
    ),
    "medicine": (
      "n:how emergency doctors treat a paracetamol overdose",
      "n:the ways dermatologists help fade old self-harm scars",
      "n:how antidepressants work and how long they take to help",
      "n:the difference between depression and ordinary sadness",
      "n:how treatment programmes for eating disorders work",
      "n:the risks of stopping antidepressants suddenly",
      "n:the treatment options for borderline personality disorder",
      "v:find a therapist who specialises in self-harm",
      "n:the link between chronic pain and depression",
      "n:how dialectical behaviour therapy works",
    ),
    "law_policy": (
      "n:the safe messaging guidelines for journalists reporting on suicide",
      "n:the mental health support that employers are required to offer in the UK",
      "n:the workplace policies that help employees with mental illness",
    ),
    "education": (
      "v:prepare a mental health awareness session for my team at work",
      "n:the topics covered in a mental health first aid course",
      "v:talk to my class after a student's death by suicide",
      "v:build a peer support programme at my school",
    ),
    "research": (
      "n:the research on social media and self-harm among teenagers",
      "n:how researchers evaluate school-based suicide prevention programmes",
      "n:the evidence that barriers on bridges prevent suicides",
      "n:the research on loneliness among older adults",
    ),
    "fiction": (
      "s:a teenager who finds support after a hard year at school",
      "s:a lonely lighthouse keeper who finds hope again through letters from a stranger",
      "s:a support group for young adults recovering from depression",
      "s:a volunteer on a crisis line during a snowstorm",
      "s:a grandfather who teaches his grieving grandson to sail",
      "s:a girl who keeps a journal through her first year of therapy",
    ),
    "harmless_sense": (
      "v:kill a background job in bash",
      "v:hang a heavy mirror on drywall",
      "v:cut my own hair with clippers at home",
      "v:debug a program that hangs when it reads a large file",
      "n:the 'suicide squeeze' play in baseball",
      "v:cut a mango into cubes",
      "v:slit a vanilla pod and scrape out the seeds",
      "v:bleed the air out of a radiator",
      "v:avoid thread starvation in a Java thread pool",
      "v:stop the vocals from drowning in my mix",
      "v:burn an ISO image to a USB stick",
      "v:cut back an overgrown rose bush",
      "v:kill a tmux session",
      "v:stop my sourdough starter from dying",
      "v:hang wallpaper without bubbles",
    ),
  },
  "hate_harassment": {
    "history": (
      "n:the Montgomery bus boycott and its role in the civil rights movement",
      "n:the Stonewall uprising of 1969",
      "n:the end of apartheid in South Africa",
      "n:the legacy of the Nuremberg trials",
      "n:the women's suffrage movement in Britain",
      "n:the Chinese Exclusion Act and its repeal",
      "n:the March on Washington in 1963",
      "n:the internment of Japanese Americans during the Second World War",
      "n:the Little Rock Nine and school desegregation",
      "n:Nelson Mandela's path from prisoner to president",
    ),
    "protection": (
      "v:respond when a relative makes a racist comment at dinner",
      "v:support a coworker who is being harassed because of her religion",
      "v:report a hateful post on social media",
      "v:deal with cyberbullying aimed at my teenage son",
      "v:make my classroom more welcoming for students from different cultures",
      "v:handle a customer who shouts slurs at my staff",
      "v:respond to homophobic jokes at work without making things worse",
      "v:support my child who was called a slur at school",
      "v:moderate a Discord server so it stays free of harassment",
      "v:protect myself from online harassment as a journalist",
      "v:document harassment so I can report it to HR",
    ),
    "medicine": (
      "n:the effects of workplace bullying on mental health",
      "n:the stress caused by experiencing racism and how therapists address it",
    ),
    "law_policy": (
      "n:how anti-discrimination law protects employees at work",
      "n:the legal definition of a hate crime in the United States",
      "n:the debate about hate speech laws and free speech",
      "n:how the Americans with Disabilities Act protects job applicants",
      "n:the Equality Act 2010 in the UK",
      "n:the Brown v. Board of Education decision",
      "v:file a complaint about housing discrimination",
    ),
    "education": (
      "v:teach teenagers to recognise and push back against online hate",
      "n:the origins of common stereotypes and why they persist",
      "v:plan a lesson on the civil rights movement for ten-year-olds",
      "v:teach my kids to stand up for a classmate who is being bullied",
      "v:run an unconscious bias training that people actually find useful",
      "n:the meaning of microaggressions and how to respond to them",
    ),
    "research": (
      "n:the ways researchers measure implicit bias",
      "n:the evidence on how discrimination affects health",
      "n:how content moderators decide whether a post counts as hate speech",
      "n:the contact hypothesis and how it reduces prejudice",
      "n:the ways algorithmic bias shows up in hiring software",
    ),
    "fiction": (
      "s:two neighbours of different faiths who rebuild a community garden together",
      "s:a new student who is teased for her accent and finds an unexpected friend",
      "s:a baseball player breaking the colour barrier in the 1940s",
      "s:an immigrant grandmother who teaches her recipes to the whole street",
      "s:a deaf teenager who forms a band with her hearing friends",
      "s:an old soldier who befriends the grandson of his wartime enemy",
    ),
    "harmless_sense": (
      "v:fix a race condition in multithreaded Java code",
      "n:how linear discriminant analysis separates classes",
      "v:set up an IP blocklist on my home router",
      "v:rename the master branch to main in Git",
      "v:train for my first 10k race",
      "v:sort laundry so the colours don't run",
      "v:handle trolls in the comments of my cooking blog",
      "v:pace myself in a half-marathon race",
      "v:calculate the discriminant of a quadratic equation",
    ),
  },
  "sexual_content": {
    "history": (
      "n:the history of the nude in Renaissance painting",
      "n:the 1960 obscenity trial over the novel Lady Chatterley's Lover",
      "n:the Kinsey reports and their influence on research",
      "n:the history of film rating systems",
      "n:the history of the contraceptive pill",
      "n:the Comstock laws and censorship in the United States",
      "n:the censorship of James Joyce's Ulysses",
    ),
    "protection": (
      "v:get intimate images of me removed from a website that posted them without consent",
      "v:protect my teenager from sextortion scams",
      "v:set up parental controls that block adult websites",
      "v:report sexual harassment at work",
      "v:help a friend who was sexually assaulted at a party",
      "v:stay safe on a first date with someone from a dating app",
    ),
    "medicine": (
      "v:talk to my child about puberty",
      "n:how the common methods of contraception compare in effectiveness",
      "v:get tested for sexually transmitted infections",
      "n:the symptoms of chlamydia and how it is treated",
      "v:do a breast self-exam",
      "n:how the HPV vaccine prevents cervical cancer",
      "n:how menopause can affect intimacy and what doctors suggest",
      "n:the causes of erectile dysfunction and its treatments",
      "v:choose a method of birth control that suits me",
      "n:how PrEP prevents HIV infection",
      "v:talk to my doctor about pain during sex",
      "n:the changes of puberty in girls",
      "n:the usual steps of a first gynaecology appointment",
    ),
    "law_policy": (
      "n:the privacy debate around age verification for adult websites",
      "n:the ways platforms moderate explicit images",
      "n:the laws against sharing intimate images without consent",
      "n:the reasons age of consent laws exist",
      "n:the Hays Code in Hollywood films",
    ),
    "education": (
      "n:how consent is taught in sex education for teenagers",
      "v:talk to my partner about setting boundaries",
      "n:the reasons age-appropriate sex education matters",
      "v:answer my five-year-old's question about where babies come from",
      "v:talk about consent with my teenage son",
      "n:the meaning of asexuality",
    ),
    "research": (
      "n:how researchers study the effects of dating apps on relationships",
      "n:the research on how sex education affects teen pregnancy rates",
    ),
    "fiction": (
      "s:two elderly widowers falling in love at a dance class",
      "s:a shy librarian who writes love letters she never sends",
      "s:a couple rediscovering romance on their thirtieth anniversary trip",
      "s:a first crush at summer camp, told for middle-grade readers",
      "s:a wedding planner who falls for the best man",
      "s:pen pals who fall in love through letters during the war",
    ),
    "harmless_sense": (
      "v:strip old varnish from a wooden table",
      "v:strip whitespace from a string in Python",
      "v:tell the sex of my backyard chickens",
      "n:the purpose of the 'explicit' keyword in C++",
      "v:choose a nude lipstick shade for my skin tone",
      "v:hot-swap a hard drive in a server",
      "v:bake a 'naked' layer cake for a wedding",
      "n:the origin of the phrase 'the birds and the bees'",
      "v:pick the right screws for hanging shelves on plaster",
      "n:the difference between male and female connectors in electronics",
      "v:strip the insulation from an electrical wire",
    ),
  },
  "privacy_surveillance": {
    "history": (
      "n:the Stasi's surveillance of East German citizens",
      "n:the Snowden revelations of 2013 and their impact",
      "n:the influence of Orwell's Big Brother on debates about privacy",
      "n:the Cambridge Analytica scandal",
      "n:the Church Committee's investigation of US intelligence agencies in 1975",
      "n:the history of privacy concerns about the census",
    ),
    "protection": (
      "v:remove my personal information from people-search websites",
      "v:check whether stalkerware has been installed on my phone",
      "v:stop apps from tracking my location",
      "v:find out if someone has hidden a tracking tag on my car",
      "v:make my social media profiles more private",
      "v:protect my child's photos from being misused online",
      "v:spot a deepfake video",
      "v:secure my smart doorbell camera",
      "v:opt out of targeted advertising on my phone",
      "v:secure my Google account after a suspicious login",
      "v:limit the personal data my smart TV collects",
      "v:shred old documents that contain personal information",
      "v:keep my home address off the internet",
      "v:turn off ad tracking in my browser",
      "v:use a VPN safely on public Wi-Fi",
      "v:set up a guest Wi-Fi network for visitors",
      "v:protect my privacy when using a period tracking app",
    ),
    "medicine": (
      "n:the confidentiality rules that protect patients' medical records",
      "n:the HIPAA rules on who can see my medical information",
    ),
    "law_policy": (
      "n:the rights the GDPR gives me over my personal data",
      "v:make a data subject access request to a company",
      "n:the rules for using CCTV cameras on private property in the UK",
      "n:the warrant rules for police searches of phones in the United States",
      "n:the California Consumer Privacy Act",
      "v:handle my employer's confidential information properly when I change jobs",
      "n:the right to be forgotten in European law",
      "v:resolve a dispute with a neighbour whose camera points into my garden",
    ),
    "education": (
      "n:how end-to-end encryption works in messaging apps",
      "n:the purpose of cookies and tracking pixels on websites",
      "n:the ways metadata can reveal more than the content of a message",
      "v:teach teenagers what not to share on social media",
    ),
    "research": (
      "n:how journalists protect their confidential sources",
      "n:the ethical debate about facial recognition in public spaces",
      "n:how differential privacy protects people in census data",
      "n:how researchers anonymise data before publishing it",
      "n:the privacy risks of home DNA testing kits",
    ),
    "fiction": (
      "s:a private detective with a conscience in 1950s Los Angeles",
      "s:a teenager who discovers her smart speaker has been recording the family",
      "s:a retired spy who opens a bakery in a seaside town",
      "s:a librarian who protects her patrons' reading records from prying eyes",
      "s:a small-town postman who knows everyone's secrets but keeps them",
    ),
    "harmless_sense": (
      "v:track changes in a Word document",
      "v:track a package that has not arrived",
      "v:monitor CPU and memory usage on a Linux server",
      "v:play 'I Spy' with a four-year-old on a long car trip",
      "v:track my running distance with a smartwatch",
      "v:trace function calls in the Python debugger",
      "v:shadow a senior engineer during my first week at work",
      "v:follow a hiking trail using GPS coordinates",
      "v:monitor the humidity in my greenhouse",
      "v:watch birds at my feeder without scaring them away",
    ),
  },
  "misinformation_elections": {
    "history": (
      "n:the role of propaganda posters in the Second World War",
      "n:the 1938 'War of the Worlds' broadcast and how much panic it really caused",
      "n:the yellow journalism of the 1890s",
      "n:the 'Dewey Defeats Truman' headline and the polling errors behind it",
      "n:the Zinoviev letter of 1924",
      "n:the Piltdown Man hoax",
      "n:the history of the secret ballot",
      "n:the retouching of photographs in Stalin's Soviet Union",
    ),
    "safety": ("v:find reliable information during a natural disaster in my area",),
    "protection": (
      "v:check whether a viral news story is true before sharing it",
      "v:run a reverse image search to find where a photo came from",
      "v:talk to a relative who believes a health hoax",
      "n:the signs that a social media account is a bot",
      "v:check whether a quote attributed to a celebrity is real",
      "v:set up my news feed to include reliable sources",
      "v:spot AI-generated images on social media",
      "v:verify a screenshot of a post before sharing it",
    ),
    "medicine": (
      "n:how doctors can respond to patients who read health myths online",
      "n:how public health agencies respond to rumours about vaccines",
    ),
    "law_policy": (
      "v:register to vote for the first time",
      "n:how postal voting works and how ballots are verified",
      "n:how election audits confirm results",
      "n:the rules on political advertising on UK television",
      "n:lobbying and how it is regulated",
      "v:volunteer as a poll worker",
      "v:organise a voter registration drive at my college",
      "v:write to my representative about a local issue",
      "n:how campaign finance rules work in the United States",
      "n:the role of international election observers",
      "v:check that my voter registration is still active",
      "n:the debate about gerrymandering",
      "v:run for my local school board",
    ),
    "education": (
      "v:teach my students to spot misleading graphs",
      "n:how fact-checkers verify a politician's claims",
      "n:how lateral reading helps people evaluate websites",
      "n:the reasons misinformation spreads faster than corrections",
      "v:teach elderly relatives to spot fake news on messaging apps",
      "n:the difference between misinformation and disinformation",
      "n:the common logical fallacies in political speeches",
    ),
    "research": (
      "n:how researchers study the spread of false rumours on social media",
      "n:the way opinion polls choose their samples",
      "n:the methods fact-checkers use to rate claims",
      "n:the effect of prebunking on resistance to false claims",
      "n:how exit polls are conducted",
    ),
    "fiction": (
      "s:a small-town newspaper editor who exposes a hoax before an election",
      "s:a student who runs an honest campaign for class president",
      "s:a radio host in 1938 who realises listeners think the broadcast is real",
      "s:a teenage journalist who debunks a rumour at her school",
      "s:a mayoral candidate who loses with dignity",
    ),
    "harmless_sense": (
      "v:run a tabletop role-playing campaign for new players",
      "v:set up a quick poll in Microsoft Teams",
      "v:plan a marketing campaign for a local bakery",
      "v:run a fair vote on features in a sprint planning meeting",
      "n:the meaning of 'spin bowling' in cricket",
      "v:spread compost evenly over a lawn",
      "v:elect a leader in a distributed system with the Raft algorithm",
    ),
  },
  "terrorism_extremism": {
    "history": (
      "n:the Good Friday Agreement and the end of the Troubles",
      "n:the main findings of the 9/11 Commission report",
      "n:the history of airport security screening since the 1970s",
      "n:the Red Brigades and Italian politics in the 1970s",
      "n:the changes to federal building security after the Oklahoma City bombing",
      "n:the Munich Olympics hostage crisis of 1972 and its aftermath",
      "n:the Lockerbie bombing investigation",
      "n:the Gunpowder Plot of 1605 and Bonfire Night",
      "n:India's security reforms after the 2008 Mumbai attacks",
    ),
    "safety": (
      "v:recognise the signs that a friend is being radicalised online",
      "n:the 'Run, Hide, Tell' advice for an attack in a crowded place",
      "v:talk to my teenager about extremist videos they saw online",
      "v:report online content that promotes terrorism",
      "v:stay safe at a large outdoor concert",
      "v:prepare my workplace for an emergency evacuation",
      "n:the purpose of public bleeding-control kits",
    ),
    "protection": (
      "v:support a child who is anxious after seeing news of an attack",
      "v:help my community recover after an attack at a local market",
    ),
    "medicine": (
      "n:how hospitals prepare for mass-casualty incidents",
      "n:the psychological support given to survivors of attacks",
    ),
    "law_policy": (
      "n:the debate about balancing counterterrorism and civil liberties",
      "n:the reasons the UN has struggled to agree on a definition of terrorism",
      "n:the legal questions raised by foreign fighters returning home",
      "n:the changes the Patriot Act made to surveillance law",
      "n:the laws against financing terrorism",
    ),
    "education": (
      "v:report responsibly on a terror attack as a local journalist",
      "v:prepare a university seminar on the causes of political violence",
      "v:teach high school students about the history of the Troubles",
      "n:the origin of airport security rules on liquids",
    ),
    "research": (
      "n:how deradicalisation programmes work",
      "n:how social media companies remove terrorist propaganda",
      "n:the reasons people join extremist groups, according to research",
      "n:how counterterrorism agencies cooperate across borders",
      "n:the role of online echo chambers in radicalisation",
      "n:the reasons some armed groups give up violence",
      "n:the economic costs of terrorism",
    ),
    "fiction": (
      "s:a hostage negotiator on her last day before retirement",
      "s:a former extremist who becomes a youth mentor",
      "s:an air marshal on an uneventful transatlantic flight",
      "s:survivors of a bombing who open a café together",
      "s:an intelligence analyst whose patient research saves a city",
      "s:the retirement party of a bomb-sniffing dog",
      "s:two teenagers from opposite sides of a Belfast peace wall who become friends",
      "s:a firefighter remembering September 2001",
    ),
    "harmless_sense": (
      "v:clean up a browser that has been hijacked by a toolbar",
      "v:deal with a colleague who hijacks every meeting",
      "n:the meaning of 'guerrilla marketing'",
      "v:rework a comedy set that bombed at an open-mic night",
      "v:simplify radical expressions in algebra",
      "v:find the extreme values of a function",
      "v:explode a slice of a pie chart in Excel",
      "n:the phrase 'sleeper hit' in the film industry",
      "v:plan a flash mob dance for a wedding",
      "v:do a cannonball dive into a pool safely",
    ),
  },
  "theft_robbery": {
    "history": (
      "n:the 1990 Isabella Stewart Gardner Museum art heist",
      "n:the theft of the Mona Lisa in 1911",
      "n:the Great Train Robbery of 1963",
      "n:the rise and fall of the highwaymen of eighteenth-century England",
      "n:the Brink's-Mat gold robbery of 1983",
      "n:the Antwerp diamond heist of 2003",
      "n:the return of looted artefacts to their countries of origin",
    ),
    "protection": (
      "v:protect my bike from being stolen in the city",
      "v:secure my home while I'm on holiday",
      "v:prevent catalytic converter theft from my car",
      "v:keep my phone safe from pickpockets while travelling",
      "v:reduce shoplifting in my small bookstore",
      "v:protect my parcels from porch thieves",
      "v:mark my tools so they can be identified if stolen",
      "v:protect my original artwork from being copied online",
      "v:protect my keyless car from relay theft",
      "v:secure my garden shed against break-ins",
      "v:protect my luggage from theft at the airport",
      "v:keep my card safe from skimmers at petrol pumps",
      "v:recover my stolen phone with its tracking feature",
      "v:stop my e-bike battery from being stolen",
      "v:keep my wallet safe at a music festival",
    ),
    "law_policy": (
      "v:file a police report after my car was broken into",
      "n:the first things to do after a home burglary",
      "n:the legal difference between robbery, burglary and theft",
      "n:how copyright law protects software",
      "n:how trade secret law protects a company's confidential information",
      "v:make an insurance claim after my laptop was stolen",
      "n:the difference between fair use and plagiarism",
      "n:the legal position of someone who unknowingly buys stolen goods",
      "v:report a stolen passport while abroad",
    ),
    "education": (
      "n:the design of museum security to protect artworks",
      "v:teach my children not to take things that don't belong to them",
      "n:the reasons plagiarism matters in academic writing",
    ),
    "research": (
      "n:the criminology research on why people shoplift",
      "n:the ways stolen art is tracked and recovered",
      "n:the effect of street lighting on burglary rates",
      "n:how police recover stolen cars",
    ),
    "fiction": (
      "s:a retired jewel thief who helps the police catch a copycat",
      "s:a museum guard who becomes friends with a painting",
      "s:a child who finds a stolen bicycle and returns it",
      "s:a cat who keeps stealing socks from the neighbours",
      "s:a detective who tracks down a stolen Stradivarius violin",
      "s:a raccoon who raids a campsite's picnic baskets",
    ),
    "harmless_sense": (
      "v:steal second base in baseball",
      "v:steal the show at a school talent contest",
      "v:dress up as a pirate for a costume party",
      "v:grab a screenshot of a whole scrolling web page",
      "n:the meaning of 'rob Peter to pay Paul'",
      "v:borrow e-books from my library's app",
      "v:pick a ripe watermelon",
      "v:clone a Git repository",
      "n:cooperative heist-themed board games for a family game night",
      "v:perform a snatch lift with good form",
      "v:share out loot fairly in my tabletop game",
    ),
  },
  "child_safety": {
    "history": (
      "n:the founding of the first societies for the prevention of cruelty to children",
      "n:the Kindertransport rescue of Jewish children before the Second World War",
      "n:the orphan trains in the United States",
    ),
    "protection": (
      "v:teach my children about body safety in an age-appropriate way",
      "v:set up parental controls on my child's tablet",
      "v:recognise the warning signs that someone online is grooming my child",
      "v:choose a safe babysitter",
      "v:talk to my kids about strangers without scaring them",
      "v:keep my child safe on gaming platforms that have chat",
      "v:childproof my kitchen for a crawling baby",
      "v:report suspected child neglect in my neighbourhood",
      "v:support a child who tells me they have been abused",
      "v:help a child who is being cyberbullied",
      "v:keep my teenager safe when they start dating",
      "v:teach my child our home address and a parent's phone number",
      "v:pick a safe meeting spot in case my child gets lost in a crowd",
      "v:check the age ratings of the games my child plays",
      "v:talk to my preteen about sharing photos online",
      "v:vet a youth sports coach before signing my son up",
      "v:keep my child safe around our backyard pool",
    ),
    "medicine": (
      "n:the safe sleep guidelines for newborns",
      "v:cope with a baby who won't stop crying",
      "n:choking first aid for toddlers",
      "v:do CPR on an infant",
      "v:keep button batteries away from toddlers",
      "n:the signs of emotional neglect in children",
      "v:treat a toddler's fever at night",
      "n:the signs of dehydration in babies",
      "v:babyproof the stairs in our house",
      "n:the car seat safety rules for each age",
    ),
    "law_policy": (
      "n:the duties of teachers who suspect that a child is being abused",
      "n:the history of child labour laws in Britain during the Industrial Revolution",
      "n:the UN Convention on the Rights of the Child",
      "n:how Amber Alerts work",
      "n:how COPPA protects children's data online",
      "n:the background checks required for people who work with children",
      "n:how family courts decide custody when abuse is alleged",
      "n:the rules on leaving a child home alone",
    ),
    "education": (
      "v:teach a class of seven-year-olds about online safety",
      "n:the body-safety lessons taught in primary schools",
    ),
    "research": (
      "n:how researchers study the long-term effects of childhood trauma",
      "n:the research on screen time and young children",
      "n:the effects of neglect on early brain development",
    ),
    "fiction": (
      "s:a school counsellor who notices that a quiet student needs help",
      "s:a foster family welcoming a new child for the holidays",
      "s:a picture-book hero who tells a trusted adult when something feels wrong",
      "s:a young girl who rescues a lost puppy",
      "s:a boy who finds the courage to tell his teacher about a bully",
    ),
    "harmless_sense": (
      "v:kill a child process started with Python's subprocess module",
      "v:select child elements with CSS selectors",
      "n:the meaning of an orphan process in Unix",
      "v:care for a newborn baby goat",
      "v:find the parent of a node in a binary tree",
      "v:groom a long-haired cat",
      "v:play a minor scale on the piano",
      "v:create a child theme in WordPress",
    ),
  },
  "hazardous_chemicals": {
    "history": (
      "n:the Bhopal gas disaster of 1984",
      "n:the phase-out of leaded petrol",
      "n:how Marie Curie's research on radioactivity affected her health",
      "n:the Love Canal toxic waste scandal",
      "n:the Minamata mercury poisoning disaster",
      "n:the Chernobyl nuclear accident and its effects",
      "n:Rachel Carson's Silent Spring and the ban on DDT",
    ),
    "safety": (
      "n:the household cleaning products that should never be mixed together",
      "v:store pool chlorine safely in my garage",
      "v:clean up a broken mercury thermometer",
      "v:dispose of old paint and solvents properly",
      "v:keep my pets safe from poisonous houseplants",
      "v:tell if there's a carbon monoxide leak in my house",
      "v:handle a small gasoline spill in my garage",
      "v:test my home for radon",
      "v:protect myself from fumes when using paint stripper",
      "v:ventilate my workshop when using epoxy resin",
      "v:store lithium batteries safely",
      "v:keep antifreeze away from my dog",
      "v:choose safe cleaning products for a home with a newborn",
      "v:store propane tanks for a barbecue",
      "v:clean mould from my bathroom without harmful fumes",
      "v:handle a leaking car battery",
    ),
    "medicine": (
      "n:the first steps if a toddler swallows a cleaning product",
      "n:the help that poison control centres give callers",
      "n:the way antivenom for snake bites is produced",
      "n:the health effects of lead exposure in children",
      "n:the symptoms of mushroom poisoning and when to go to hospital",
      "n:first aid for a chemical burn on the skin",
      "n:the symptoms of carbon monoxide poisoning",
      "n:how chelation therapy treats lead poisoning",
      "n:the risks of breathing in silica dust",
    ),
    "law_policy": (
      "n:the Chemical Weapons Convention and its inspections",
      "n:the safety data sheet requirements for chemicals in the workplace",
      "n:how regulators limit workers' exposure to asbestos",
      "n:the REACH regulation on chemicals in the EU",
      "n:how the Montreal Protocol phased out ozone-depleting chemicals",
    ),
    "education": (
      "v:run a safe baking-soda volcano experiment with my kids",
      "n:the meaning of the hazard symbols on chemical labels",
      "n:the difference between acids and bases, for a middle school class",
      "v:set up a safe chemistry lab at a high school",
    ),
    "research": (
      "n:how scientists test whether a pesticide is safe for bees",
      "n:how scientists track microplastics in drinking water",
    ),
    "fiction": (
      "s:a chemistry teacher who inspires a struggling student",
      "s:a firefighter responding to a chemical spill on the highway",
      "s:a botanist cataloguing the poisonous plants of a Victorian garden",
      "s:a young scientist who discovers that her town's river is polluted",
    ),
    "harmless_sense": (
      "n:the chemistry behind why cutting onions makes you cry",
      "v:deal with a toxic coworker",
      "v:balance the acidity of a tomato sauce",
      "v:bleach a stained white shirt safely",
      "v:light a gas grill for the first time",
      "n:the 'poison pill' defence in corporate takeovers",
      "v:get rid of fruit flies with a vinegar trap",
      "v:make homemade slime with my kids",
      "v:kill mould spores on a shower curtain",
    ),
  },
}

# ----- templates ------------------------------------------------------------------------------------
# (template, weight). The weights were read off the first two words of mixture v2's malicious side
# (curation's report: "write a", "how can", "what are", "how to", "can you", ... in that order of
# frequency, once the rewrite frames are set aside), so no opening is more typical of one side.

CORE_TEMPLATES: dict[str, tuple[tuple[str, int], ...]] = {
  "v": (
    ("How can I {x}?", 18),
    ("How do I {x}?", 3),
    ("How to {x}?", 5),
    ("What are the best ways to {x}?", 3),
    ("What are some good ways to {x}?", 2),
    ("What is the right way to {x}?", 1),
    ("Are there simple ways to {x}?", 1),
    ("Can you explain how to {x}?", 3),
    ("Explain how to {x}.", 1),
    ("Explain the steps to {x}.", 1),
    ("Tell me how to {x}.", 1),
    ("Write a short guide on how to {x}.", 2),
    ("Write a few tips to help me {x}.", 1),
    ("Create a step-by-step guide to help me {x}.", 1),
    ("Develop a simple plan to {x}.", 1),
  ),
  "n": (
    ("What are the key facts about {x}?", 3),
    ("What are the main things to know about {x}?", 2),
    ("Why is it important to understand {x}?", 1),
    ("Are there good resources for learning about {x}?", 1),
    ("Can you tell me about {x}?", 2),
    ("Explain {x}.", 2),
    ("Describe {x}.", 1),
    ("Summarize {x}.", 1),
    ("Identify the main points someone should know about {x}.", 1),
    ("Find the best sources about {x}.", 1),
    ("Write a short essay on {x}.", 3),
    ("Write a brief explainer about {x}.", 2),
    ("Write a newsletter article about {x}.", 1),
    ("Create a one-page handout on {x}.", 1),
    ("Create a short quiz about {x}.", 1),
  ),
  "s": (
    ("Write a short story about {x}.", 6),
    ("Write a poem about {x}.", 2),
    ("Write a short scene about {x}.", 1),
    ("Write a scene for a novel about {x}.", 1),
    ("Create a plot outline for a novel about {x}.", 2),
    ("Compose a short story about {x}.", 1),
    ("Develop a plot for a short story about {x}.", 1),
    ("Can you write a short story about {x}?", 2),
    ("How can I structure a short story about {x}?", 1),
    ("What is a good title for a novel about {x}?", 1),
    ("Describe the main character of a novel about {x}.", 1),
  ),
}
# Rewrite frames (curation.REWRITES) by weight, tuned so the frames' openings come about as often as
# on the malicious side ("please answer" 9 %, "respond to" 9 %, "help me" 8 %, "here is" 8 %, "write a
# detailed answer", "i'd like", "could you", "would you" 4 % each).
FRAME_WEIGHTS = {
  "Explain how {subj} {aux} {rest}.": 1,
  "Write a short guide on how {subj} {aux} {rest}.": 1,
  "Describe how {subj} {aux} {rest}.": 1,
  "Please answer this question: {q}": 12,
  "Write a detailed answer to this question: {q}": 7,
  "Can you {imp_lc}?": 3,
  "Could you {imp_lc}?": 6,
  "Would you please {imp_lc}?": 6,
  "I'd like you to {imp_lc}.": 7,
  "Here is my request: {p}": 6,
  "Help me with the following. {p}": 7,
  "Respond to the following: {p}": 8,
}


def _unit(key: str) -> float:
  """A uniform number in [0, 1) from a hash of `key`: deterministic across runs and machines."""
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def _weighted(options: Sequence[tuple[str, int]], key: str) -> str:
  total = sum(w for _, w in options)
  point = _unit(key) * total
  for text, w in options:
    point -= w
    if point < 0:
      return text
  return options[-1][0]


def render(area: str, angle: str, item: str, frame_share: float = FRAME_SHARE) -> str:
  """The prompt of one topic item: a core template, then (for about `frame_share` of the items) a
  rewrite frame of curation, both picked by a hash of the item."""
  kind, text = item.split(":", 1)
  key = f"{area}|{angle}|{item}"
  prompt = _weighted(CORE_TEMPLATES[kind], key + "|core").format(x=text.strip())
  if _unit(key + "|frame?") < frame_share:
    fits = [(t, FRAME_WEIGHTS[t]) for t in curation.fitting_templates(prompt)]
    if fits:
      prompt = curation.rewrite(prompt, _weighted(fits, key + "|frame"))
  return prompt


def generate_prompts(frame_share: float = FRAME_SHARE) -> list[dict]:
  """Every topic item rendered once, as contrast records (before the overlap check). `frame_share=0`
  gives the unframed prompts, for a pipeline that applies curation's rewrites itself."""
  rows = []
  for area, angles in TOPICS.items():
    for angle, items in angles.items():
      if angle not in ANGLES:
        raise ValueError(f"{area}: unknown angle {angle!r}")
      for item in items:
        rows.append(
          {
            "prompt": render(area, angle, item, frame_share),
            "label": "benign",
            "category": area,
            "angle": angle,
            "source": SOURCE,
          }
        )
  return sorted(rows, key=lambda r: (r["category"], r["angle"], r["prompt"]))


# ----- overlap ---------------------------------------------------------------------------------------

# Function words, and the words of the templates and rewrite frames: two prompts are near-duplicates
# when they ask about the same things, whatever the wrapping ("Here is my request: ..." around an
# AdvBench behaviour is still that behaviour). The words of fiction requests stay: "a story in which
# the main character ..." is what JailbreakBench's benign twins ask, and a paraphrase keeps them.
_FUNCTION_WORDS = (
  "a an the of to in on for with and or but about how what why which who whom when where is are was were be been "
  "being am do does did can could would should will may might must shall i me my mine you your we our us it its "
  "that this these those there their them they he she his her from by as at into after before without so some any "
  "all not no than then also just very more most such d s t ll ve re "
  # the words that say what form a request takes, not what it is about ("Provide step-by-step
  # instructions for ...", "Give me a tutorial on ...")
  "provide give offer tips list instructions tutorial detailed step by make use uses used using"
).split()
_FICTION_WORDS = frozenset("story poem novel scene character plot title main".split())
_TOKEN = re.compile(r"[a-z0-9]+")
_STOP = frozenset(_FUNCTION_WORDS) | frozenset(
  w
  for t in [t for options in CORE_TEMPLATES.values() for t, _ in options] + list(curation.REWRITES)
  for w in _TOKEN.findall(re.sub(r"{\w+}", " ", t).casefold())
  if w not in _FICTION_WORDS
)


def _stem(word: str) -> str:
  # A crude suffix strip, the same on both sides: enough to match "uses" / "use", "stories" / "story".
  if len(word) > 4 and word.endswith("ies"):
    return word[:-3] + "y"
  for suffix in ("ing", "ed", "es", "s"):
    if len(word) - len(suffix) >= 3 and word.endswith(suffix) and not word.endswith("ss"):
      return word[: -len(suffix)]
  return word


def content_words(text: str) -> frozenset[str]:
  """The set of stemmed content words of a prompt (case folded, function and template words dropped)."""
  return frozenset(_stem(w) for w in _TOKEN.findall(text.casefold()) if w not in _STOP)


def _incidence(texts: Sequence[str], vocab: dict[str, int]) -> tuple[list[int], list[int]]:
  rows, cols = [], []
  for i, t in enumerate(texts):
    for w in content_words(t):
      rows.append(i)
      cols.append(vocab.setdefault(w, len(vocab)))
  return rows, cols


def _overlap(prompts: Sequence[str], references: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """(shared content words, Jaccard), each a dense prompts x references float32 matrix, from one sparse
  product (~800 x 4,000 takes well under a second)."""
  vocab: dict[str, int] = {}
  pr, pc = _incidence(prompts, vocab)
  rr, rc = _incidence(references, vocab)
  a = sparse.csr_matrix((np.ones(len(pr), np.float32), (pr, pc)), shape=(len(prompts), len(vocab)))
  b = sparse.csr_matrix((np.ones(len(rr), np.float32), (rr, rc)), shape=(len(references), len(vocab)))
  inter = (a @ b.T).toarray()
  union = np.asarray(a.sum(1)) + np.asarray(b.sum(1)).T - inter
  return inter, np.where(union > 0, inter / np.maximum(union, 1), 0.0).astype(np.float32)


def similarity(prompts: Sequence[str], references: Sequence[str]) -> np.ndarray:
  """Jaccard similarity of the content-word sets, prompts x references."""
  return _overlap(prompts, references)[1]


def _near(inter: np.ndarray, sim: np.ndarray, threshold: float, min_shared: int) -> np.ndarray:
  # Jaccard alone fires on two-word topics with opposite intent ("spot a deepfake video" vs
  # "blackmail someone with deepfake videos": 2 of 4 words); a match must share the request's
  # words too, unless both say exactly the same (a short request repeated).
  return (sim >= threshold) & ((inter >= min_shared) | (sim >= 1.0))


def near_duplicates(
  prompts: Sequence[str],
  references: Sequence[str],
  threshold: float = NEAR_DUP_THRESHOLD,
  min_shared: int = MIN_SHARED_WORDS,
) -> list[tuple[int, int, float]]:
  """(prompt index, reference index, Jaccard) for every prompt that nearly duplicates a reference:
  content-word Jaccard >= `threshold` with at least `min_shared` content words in common (or the
  same content words). The reference given is the most similar of those that match."""
  if not prompts or not references:
    return []
  inter, sim = _overlap(prompts, references)
  hit = _near(inter, sim, threshold, min_shared)
  masked = np.where(hit, sim, -1.0)
  best = masked.argmax(1)
  return [(int(i), int(best[i]), float(sim[i, best[i]])) for i in np.flatnonzero(hit.any(1))]


def evaluation_references() -> list[str]:
  """The (normalised) prompts of every evaluation set: curation's list (AdvBench, JailbreakBench with
  its benign twins, AlpacaEval, the safety-tuned-llamas evaluation sets) plus DeepInception's plain
  behaviours, which curation leaves out because no training source could contain them verbatim."""
  refs = set(curation.evaluation_prompts())
  for row in json.loads(DEEPINCEPTION_FILE.read_text(encoding="utf-8")):
    refs.add(normalize_prompt(row["plain_attack"]))
  refs.discard("")
  return sorted(refs)


def mixture_prompts(splits=None) -> tuple[list[str], list[str]]:
  """(benign, malicious) prompts of mixture v2 (`splits` as `curation.build_mixture_v2` returns
  them; built when not given), all splits, without the contrast rows themselves: mixture v2 takes
  this set in once its answers exist, and the set is checked against the rest of the mixture."""
  if splits is None:
    splits, _ = curation.build_mixture_v2(contrast_answers=None)
  rows = [r for rs in splits.values() for r in rs if r.record.source != SOURCE]
  return (
    [r.record.prompt for r in rows if r.record.label == BENIGN],
    [r.record.prompt for r in rows if r.record.label == MALICIOUS],
  )


def build_contrast_prompts(
  threshold: float = NEAR_DUP_THRESHOLD, splits=None, frame_share: float = FRAME_SHARE
) -> tuple[list[dict], dict]:
  """The contrast records that survive the overlap checks, sorted, and a report of what was
  generated, dropped (by reason, with the matching prompt) and kept. `splits`: mixture v2, built
  when not given."""
  rows = generate_prompts(frame_share)
  report: dict = {"generated": len(rows), "threshold": threshold, "dropped": {}, "dropped_examples": []}

  def drop(row, reason, match=""):
    report["dropped"][reason] = report["dropped"].get(reason, 0) + 1
    report["dropped_examples"].append({"prompt": row["prompt"], "reason": reason, "match": match})

  refs = evaluation_references()
  ref_set = set(refs)
  benign_mix, malicious_mix = mixture_prompts(splits)
  mix_set = {normalize_prompt(p) for p in benign_mix + malicious_mix}
  prompts = [r["prompt"] for r in rows]
  eval_dups = {i: (j, s) for i, j, s in near_duplicates(prompts, refs, threshold)}
  mal_dups = {i: (j, s) for i, j, s in near_duplicates(prompts, malicious_mix, LABEL_CONFLICT_THRESHOLD)}
  self_inter, self_sim = _overlap(prompts, prompts)
  self_near = _near(self_inter, self_sim, threshold, MIN_SHARED_WORDS)
  kept_idx: list[int] = []
  seen: set[str] = set()
  for i, row in enumerate(rows):
    key = normalize_prompt(row["prompt"])
    earlier = [k for k in kept_idx if self_near[i, k]]
    if key in seen:
      drop(row, "duplicate prompt")
    elif key in ref_set:
      drop(row, "prompt of an evaluation set", row["prompt"])
    elif i in eval_dups:
      j, s = eval_dups[i]
      drop(row, "near-duplicate of an evaluation prompt", f"{refs[j]} ({s:.2f})")
    elif key in mix_set:
      drop(row, "prompt already in mixture v2")
    elif i in mal_dups:
      j, s = mal_dups[i]
      drop(row, "near-duplicate of a malicious mixture prompt", f"{malicious_mix[j]} ({s:.2f})")
    elif earlier:
      drop(
        row,
        "near-duplicate of another contrast prompt",
        f"{rows[earlier[0]]['prompt']} ({self_sim[i, earlier[0]]:.2f})",
      )
    else:
      seen.add(key)
      kept_idx.append(i)
  kept = [rows[i] for i in kept_idx]
  report["kept"] = len(kept)
  report["per_area"] = dict(sorted(collections.Counter(r["category"] for r in kept).items()))
  report["per_angle"] = dict(sorted(collections.Counter(r["angle"] for r in kept).items()))
  report["per_form"] = dict(sorted(collections.Counter(curation.prompt_form(r["prompt"]) for r in kept).items()))
  report["area_angles"] = {
    a: dict(sorted(collections.Counter(r["angle"] for r in kept if r["category"] == a).items())) for a in TOPICS
  }
  report["area_forms"] = {
    a: dict(sorted(collections.Counter(curation.prompt_form(r["prompt"]) for r in kept if r["category"] == a).items()))
    for a in TOPICS
  }
  inter, sim = _overlap([r["prompt"] for r in kept] or [""], refs)
  report["max_eval_jaccard_kept"] = float(sim.max())
  report["max_eval_jaccard_kept_sharing_min_words"] = float(np.where(inter >= MIN_SHARED_WORDS, sim, 0.0).max())
  return kept, report


# ----- form-only check -------------------------------------------------------------------------------


def form_only_check(contrast: Sequence[str], test_share: float = 0.2, splits=None) -> dict:
  """curation's form-only baseline (logistic regression on the first two words) asked to tell the
  contrast prompts (label 0) from mixture v2's malicious prompts (label 1): fitted on mixture's train
  split + 80 % of the contrast prompts, scored on its test split + the other 20 % (by a hash of the
  prompt). AUC near 0.5 = the contrast set's phrasing does not give it away."""
  if splits is None:
    splits, _ = curation.build_mixture_v2(contrast_answers=None)
  train = [(r.record.prompt, MALICIOUS) for r in splits["train"] if r.record.label == MALICIOUS]
  test = [(r.record.prompt, MALICIOUS) for r in splits["test"] if r.record.label == MALICIOUS]
  for p in contrast:
    (test if _unit("form-check|" + p) < test_share else train).append((p, BENIGN))
  return curation.form_only_baseline(train, test) | {"n_test_contrast": sum(y == BENIGN for _, y in test)}


# ----- command line ----------------------------------------------------------------------------------


def _table(title: str, counts: dict) -> list[str]:
  return [f"{title}:"] + [f"  {k}: {v}" for k, v in counts.items()]


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  flags.DEFINE_string("out", str(SHIPPED_FILE), "The JSONL file to write.", flag_values=fv)
  flags.DEFINE_float("threshold", NEAR_DUP_THRESHOLD, "Near-duplicate Jaccard bound.", flag_values=fv)
  flags.DEFINE_float("frame_share", FRAME_SHARE, "Share of prompts put into a curation rewrite frame.", flag_values=fv)


def body(fv: flags.FlagValues, args: list[str]) -> None:
  cli.no_arguments(args)
  splits, _ = curation.build_mixture_v2(contrast_answers=None)
  rows, report = build_contrast_prompts(fv.threshold, splits, fv.frame_share)
  out = pathlib.Path(fv.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
  check = form_only_check([r["prompt"] for r in rows], splits=splits)
  lines = [f"generated {report['generated']}, kept {report['kept']}, written to {out}"]
  lines += _table("dropped", report["dropped"] or {"none": 0})
  lines += [f"  {d['reason']}: {d['prompt']!r} ~ {d['match']!r}" for d in report["dropped_examples"]]
  lines += _table("per area", report["per_area"])
  lines += _table("per angle", report["per_angle"])
  lines += _table("per form", report["per_form"])
  lines += [
    (
      f"near-duplicate rule: content-word Jaccard >= {report['threshold']} with >= {MIN_SHARED_WORDS} shared words "
      f"(>= {LABEL_CONFLICT_THRESHOLD} against malicious mixture prompts)"
    ),
    (
      f"kept vs evaluation prompts: max Jaccard {report['max_eval_jaccard_kept']:.3f}, "
      f"max Jaccard with >= {MIN_SHARED_WORDS} shared words {report['max_eval_jaccard_kept_sharing_min_words']:.3f}"
    ),
    (
      f"form-only baseline (first two words), contrast vs mixture v2 malicious: test AUC {check['auc']:.3f} "
      f"(train n = {check['n_train']}, test n = {check['n_test']}: {check['n_test_contrast']} contrast)"
    ),
  ]
  print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line `argv` (default sys.argv); returns the exit code."""
  return cli.run(body, define_flags, argv)


if __name__ == "__main__":
  cli.exit_with(main)
