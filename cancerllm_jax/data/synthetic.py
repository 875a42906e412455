"""Seeded, PHI-free synthetic oncology data: a stand-in for the private clinical notes and pathology reports.

Every patient is first drawn as a structured :class:`Case` (cancer type, site, laterality, histology, grade, size,
TNM, metastases, receptors, treatment phase, labs, symptoms, radiation plan). The case is then *rendered* into
text, and each task's answer is *derived* from the case with fixed rules, so a model can only reach the ceiling by
reading the context: metastases come from imaging lines with negated distractors, TNM is written with prefixes
(``cT2a cN0 cM0``) while the diagnosis uses the compact form (``nsclc t2an0m0``), plans follow labs and symptoms.

Phrasings come from :class:`Pool` objects. A pool holds ``seen`` variants (train and val) and ``held`` variants
(test only); each record lists the variant ids it used in ``templates`` (``name#s3`` seen, ``name#t1`` held out,
``name#c0`` common to all splits, ``name#paper`` the paper's own question templates). The pretraining corpus may
use both, since it is unlabelled text about other patients.

Pure Python (``random`` only); the same seed gives byte-identical output.
"""
from __future__ import annotations

import json
import os
import random
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field

TASKS = ("phenotype", "diagnosis", "treatment_plan", "radonc_regimen", "radonc_modality", "radonc_icd10")
SPLITS = ("train", "val", "test")
NOT_RELEVANT = "Not relevant"

INSTRUCTIONS = {
    "phenotype": "You are a medical expert, this task involves answering the question based on the provided "
                 "context or text.",
    "diagnosis": "You are a medical expert. This task involves generating the diagnosis based on the provided "
                 "context or text",
    "treatment_plan": "You are a medical expert. This task involves generating the treatment plan based on the "
                      "provided context or text",
    "radonc_regimen": "You are a radiation oncologist. Based on the patient diagnosis details, write the radiation "
                      "treatment regimen.",
    "radonc_modality": "You are a radiation oncologist. Based on the patient diagnosis details, select the radiation "
                       "treatment modality: photon, proton, electron or brachy.",
    "radonc_icd10": "You are a radiation oncologist. Based on the patient diagnosis details, give the ICD-10 code "
                    "of the primary diagnosis.",
}

# The eight entity types with the paper's Table 1 question (Q3 asks for receptor names; Q4, "receptor type",
# is the one left for the receptor *status* entity).
ENTITY_TYPES = ("tumor_size", "histological_type", "receptor_type", "receptor_status", "tumor_laterality",
                "cancer_stage", "tumor_site", "cancer_grade")
PAPER_QUESTIONS = {
    "tumor_size": "What is the tumor size in the given context?",
    "histological_type": "What is the histological type in the given context?",
    "receptor_type": "Please identify the receptors mentioned in the provided context.",
    "receptor_status": "What is the receptor type in the given context?",
    "tumor_laterality": "Please identify the value of tumor laterality in the provided context.",
    "cancer_stage": "What is the stage of cancer in the given context?",
    "tumor_site": "Please describe the tumor location in the given context",
    "cancer_grade": "What is the grade of cancer in the given context?",
}


# ----------------------------------------------------------------------------------------------------------------
# Phrasing pools and the per-document writer
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pool:
    """Variants of one phrasing: ``seen`` ones for train/val, ``held`` ones only for test (none: common to all)."""

    name: str
    seen: tuple[str, ...]
    held: tuple[str, ...] = ()

    def options(self, split: str) -> list[tuple[str, str]]:
        """(variant id, text) pairs usable in ``split`` ('train', 'val', 'test' or 'any')."""
        if not self.held:
            return [(f"{self.name}#c{i}", t) for i, t in enumerate(self.seen)]
        seen = [(f"{self.name}#s{i}", t) for i, t in enumerate(self.seen)]
        held = [(f"{self.name}#t{i}", t) for i, t in enumerate(self.held)]
        return held if split == "test" else seen + held if split == "any" else seen


class Writer:
    """The random choices of one document: a seeded rng, the split whose phrasings it may use, the ids it used."""

    def __init__(self, rng: random.Random, split: str):
        self.rng = rng
        self.split = split
        self.used: set[str] = set()

    def pick(self, pool: Pool, **fmt: object) -> str:
        """One variant of ``pool`` (formatted with ``fmt`` when given), remembering its id."""
        vid, text = self.rng.choice(pool.options(self.split))
        self.used.add(vid)
        return text.format(**fmt) if fmt else text

    def choice(self, seq):
        return self.rng.choice(seq)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def templates(self) -> list[str]:
        return sorted(self.used)


P = Pool
HEADERS = {
    "reason": P("hdr.reason", ("Reason for visit:", "REASON FOR VISIT:", "RFV:", "Reason for Visit -"),
                ("Chief concern / reason seen:", "VISIT REASON:")),
    "site": P("hdr.site", ("Treatment site:", "TX SITE:", "Site of treatment:", "Treatment Site -"),
              ("Area under treatment:", "TREATED REGION:")),
    "subjective": P("hdr.subjective", ("Subjective:", "S:", "SUBJECTIVE:", "Interval history:"),
                    ("History of present illness:", "Patient reports:")),
    "ros": P("hdr.ros", ("Nursing review of systems:", "Nursing ROS:", "ROS (nursing):", "NURSING ROS"),
             ("Review of systems per RN:", "RN symptom review:")),
    "objective": P("hdr.objective", ("Objective:", "O:", "OBJECTIVE:", "Exam/imaging:"),
                   ("Examination and studies:", "Findings:")),
    "labs": P("hdr.labs", ("Labs:", "Lab results:", "LABS:", "Laboratory:"), ("Pertinent laboratory data:",
                                                                             "Bloodwork today:")),
    "diagnosis": P("hdr.diagnosis", ("Diagnosis:", "Dx:", "DIAGNOSIS:", "Oncologic dx:"),
                   ("Primary oncologic problem:", "Working diagnosis:")),
    "assessment": P("hdr.assessment", ("Assessment:", "A:", "ASSESSMENT:", "Impression:"),
                    ("Clinical impression:", "Summary assessment:")),
    "plan": P("hdr.plan", ("Plan:", "P:", "PLAN:", "Recommendations:"), ("Next steps:", "Disposition/plan:")),
}
SECTION_ORDER = ("reason", "site", "subjective", "ros", "objective", "labs", "diagnosis", "assessment", "plan")

MISSPELLINGS = {
    "diagnosis": "dinosis", "patient": "pateint", "received": "recieved", "tolerating": "tolerting",
    "appetite": "appetit", "occasional": "ocasional", "recommend": "reccomend", "nausea": "nausia",
    "discussed": "disscussed", "fatigue": "fatige", "denies": "denys", "weeks": "wks", "tolerated": "tolorated",
    "consistent": "consistant", "evidence": "evidance", "following": "follwing", "significant": "signficant",
    "specimen": "speciman", "identified": "identifed", "scheduled": "schedueled", "cancer": "cnacer",
}
_MISSPELL_RE = re.compile(r"\b(" + "|".join(MISSPELLINGS) + r")\b")


def misspell(w: Writer, text: str, rate: float = 0.04) -> str:
    """Replace a few common words by the misspellings real notes contain."""
    return _MISSPELL_RE.sub(lambda m: MISSPELLINGS[m.group(1)] if w.chance(rate) else m.group(1), text)


# ----------------------------------------------------------------------------------------------------------------
# The 17 cancer types
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cancer:
    """What varies by cancer type. Subsites are (text, ICD-10 template with {lat}, allowed sides)."""

    key: str
    name: str
    organ: str
    histologies: tuple[tuple[str, str], ...]
    subsites: tuple[tuple[str, str, str], ...]
    grading: str
    mets: tuple[str, ...]
    first_line: tuple[str, ...]
    second_line: tuple[str, ...]
    surgery: str
    marker: str = ""
    receptors: tuple[str, ...] = ()
    sex: str = ""
    weight: float = 1.0
    abbrev: str = ""
    staging: str = "AJCC"


CANCERS: tuple[Cancer, ...] = (
    Cancer("breast", "breast cancer", "breast",
           (("invasive ductal carcinoma", "idc"), ("invasive lobular carcinoma", "ilc")),
           (("upper outer quadrant", "C50.41{lat}", "LR"), ("upper inner quadrant", "C50.21{lat}", "LR"),
            ("lower outer quadrant", "C50.51{lat}", "LR"), ("lower inner quadrant", "C50.31{lat}", "LR"),
            ("central portion", "C50.11{lat}", "LR")),
           "nottingham", ("bone", "liver", "lung", "brain"), ("ac-t", "tchp", "weekly paclitaxel"),
           ("capecitabine", "trastuzumab deruxtecan"), "lumpectomy", "ca 27-29", ("ER", "PR", "HER2"), "F", 3.0),
    Cancer("lung", "lung cancer", "lung",
           (("adenocarcinoma", "adenoca"), ("squamous cell carcinoma", "scc"), ("small cell carcinoma", "sclc")),
           (("upper lobe", "C34.1{lat}", "LR"), ("lower lobe", "C34.3{lat}", "LR"), ("middle lobe", "C34.2", "R")),
           "differentiation", ("brain", "bone", "liver", "adrenal"), ("carboplatin/pemetrexed/pembrolizumab",
                                                                     "cisplatin/etoposide"),
           ("docetaxel", "docetaxel/ramucirumab"), "lobectomy", "", (), "", 2.4, "nsclc"),
    Cancer("colorectal", "colon cancer", "colon", (("adenocarcinoma", "adenoca"),),
           (("sigmoid colon", "C18.7", ""), ("ascending colon", "C18.2", ""), ("cecum", "C18.0", ""),
            ("transverse colon", "C18.4", ""), ("rectum", "C20", ""), ("rectosigmoid junction", "C19", "")),
           "differentiation", ("liver", "lung", "peritoneal"), ("folfox", "capox"), ("folfiri/bevacizumab",),
           "colectomy", "cea", weight=1.6),
    Cancer("prostate", "prostate cancer", "prostate", (("acinar adenocarcinoma", "adenoca"),),
           (("prostate", "C61", ""),), "gleason", ("bone", "nodal"), ("leuprolide/abiraterone", "docetaxel"),
           ("enzalutamide", "cabazitaxel"), "prostatectomy", "psa", (), "M", 1.6),
    Cancer("pancreas", "pancreatic cancer", "pancreas", (("ductal adenocarcinoma", "pdac"),),
           (("pancreatic head", "C25.0", ""), ("pancreatic body", "C25.1", ""), ("pancreatic tail", "C25.2", "")),
           "differentiation", ("liver", "peritoneal", "lung"), ("folfirinox", "gemcitabine/nab-paclitaxel"),
           ("nal-iri/5-fu",), "whipple", "ca 19-9", weight=0.9),
    Cancer("ovary", "ovarian cancer", "", (("high-grade serous carcinoma", "hgsc"),),
           (("ovary", "C56.{lat}", "LR"),), "serous", ("peritoneal", "liver"), ("carboplatin/paclitaxel",),
           ("pegylated liposomal doxorubicin",), "debulking surgery", "ca-125", (), "F", 0.8, "", "FIGO"),
    Cancer("endometrium", "endometrial cancer", "uterus", (("endometrioid adenocarcinoma", "endometrioid"),),
           (("endometrium", "C54.1", ""),), "figo", ("lung", "peritoneal"), ("carboplatin/paclitaxel/dostarlimab",),
           ("lenvatinib/pembrolizumab",), "hysterectomy", "", ("ER", "PR"), "F", 0.8, "", "FIGO"),
    Cancer("cervix", "cervical cancer", "cervix", (("squamous cell carcinoma", "scc"),),
           (("cervix", "C53.9", ""), ("endocervix", "C53.0", ""), ("exocervix", "C53.1", "")),
           "differentiation", ("lung", "nodal"), ("weekly cisplatin",),
           ("carboplatin/paclitaxel/bevacizumab",), "radical hysterectomy", "", (), "F", 0.6, "", "FIGO"),
    Cancer("bladder", "bladder cancer", "bladder", (("urothelial carcinoma", "uc"),),
           (("trigone", "C67.0", ""), ("bladder dome", "C67.1", ""), ("lateral bladder wall", "C67.2", ""),
            ("posterior bladder wall", "C67.4", "")),
           "urothelial", ("bone", "lung", "liver"), ("gemcitabine/cisplatin",), ("enfortumab vedotin",),
           "cystectomy", weight=0.8),
    Cancer("kidney", "kidney cancer", "kidney", (("clear cell renal cell carcinoma", "ccrcc"),),
           (("upper pole", "C64.{lat}", "LR"), ("lower pole", "C64.{lat}", "LR"), ("interpolar region", "C64.{lat}",
                                                                                   "LR")),
           "isup", ("lung", "bone"), ("ipilimumab/nivolumab", "pembrolizumab/axitinib"), ("cabozantinib",),
           "nephrectomy", "", (), "", 0.8, "rcc"),
    Cancer("melanoma", "melanoma", "", (("superficial spreading melanoma", "ssm"), ("nodular melanoma", "nm")),
           (("upper arm", "C43.6{lat}", "LR"), ("lower leg", "C43.7{lat}", "LR"), ("upper back", "C43.59", ""),
            ("scalp", "C43.4", "")),
           "none", ("lung", "brain", "liver"), ("nivolumab", "ipilimumab/nivolumab"), ("relatlimab/nivolumab",),
           "wide local excision", "ldh", weight=0.9),
    Cancer("head_neck", "head and neck cancer", "", (("squamous cell carcinoma", "scc"),),
           (("tonsil", "C09.9", "LR"), ("base of tongue", "C01", ""), ("glottic larynx", "C32.0", ""),
            ("oral tongue", "C02.1", "LR")),
           "differentiation", ("lung", "bone"), ("weekly cisplatin",), ("pembrolizumab",), "neck dissection",
           weight=1.0, abbrev="hnscc"),
    Cancer("esophagus", "esophageal cancer", "esophagus", (("adenocarcinoma", "adenoca"),
                                                           ("squamous cell carcinoma", "scc")),
           (("distal esophagus", "C15.5", ""), ("mid esophagus", "C15.4", ""), ("gastroesophageal junction",
                                                                                "C16.0", "")),
           "differentiation", ("liver", "lung", "nodal"), ("weekly carboplatin/paclitaxel",), ("folfox/nivolumab",),
           "esophagectomy", "", ("HER2",), "", 0.6),
    Cancer("stomach", "gastric cancer", "stomach", (("adenocarcinoma", "adenoca"),
                                                    ("signet ring cell carcinoma", "src")),
           (("gastric antrum", "C16.3", ""), ("gastric body", "C16.2", ""), ("gastric cardia", "C16.0", ""),
            ("lesser curvature", "C16.5", "")),
           "differentiation", ("liver", "peritoneal"), ("flot",), ("ramucirumab/paclitaxel",), "gastrectomy",
           "cea", ("HER2",), "", 0.6),
    Cancer("liver", "liver cancer", "liver", (("hepatocellular carcinoma", "hcc"),),
           (("right hepatic lobe", "C22.0", ""), ("left hepatic lobe", "C22.0", ""), ("hepatic segment 7", "C22.0",
                                                                                    "")),
           "differentiation", ("lung", "bone"), ("atezolizumab/bevacizumab",), ("lenvatinib",), "hepatectomy",
           "afp", (), "", 0.7, "hcc"),
    Cancer("brain", "glioblastoma", "", (("glioblastoma, idh-wildtype", "gbm"),),
           (("frontal lobe", "C71.1", "LR"), ("temporal lobe", "C71.2", "LR"), ("parietal lobe", "C71.3", "LR")),
           "who", (), ("temozolomide",), ("bevacizumab", "lomustine"), "craniotomy", weight=0.6, staging="none"),
    Cancer("thyroid", "thyroid cancer", "", (("papillary thyroid carcinoma", "ptc"),),
           (("thyroid lobe", "C73", "LR"), ("thyroid isthmus", "C73", "")),
           "none", ("lung", "bone"), ("lenvatinib",), ("cabozantinib",), "total thyroidectomy", "thyroglobulin",
           weight=0.6),
)
CANCER_BY_KEY = {c.key: c for c in CANCERS}
_CANCER_WEIGHTS = [c.weight for c in CANCERS]

NEUROTOXIC = {"folfox": "oxaliplatin", "capox": "oxaliplatin", "folfirinox": "oxaliplatin", "flot": "oxaliplatin",
              "ac-t": "paclitaxel", "weekly paclitaxel": "paclitaxel", "carboplatin/paclitaxel": "paclitaxel",
              "weekly carboplatin/paclitaxel": "paclitaxel", "gemcitabine/nab-paclitaxel": "nab-paclitaxel",
              "carboplatin/paclitaxel/dostarlimab": "paclitaxel", "docetaxel": "docetaxel"}
ORAL_OR_HORMONAL = {"leuprolide/abiraterone", "enzalutamide", "lenvatinib", "cabozantinib", "temozolomide",
                    "capecitabine", "lenvatinib/pembrolizumab"}
INTERVAL_WEEKS = {"folfox": 2, "folfirinox": 2, "flot": 2, "folfiri/bevacizumab": 2, "ac-t": 2, "nivolumab": 4,
                  "weekly paclitaxel": 1, "weekly cisplatin": 1, "weekly carboplatin/paclitaxel": 1,
                  "gemcitabine/nab-paclitaxel": 1, "temozolomide": 4, "leuprolide/abiraterone": 4}
MAINTENANCE = {"breast": "anastrozole", "prostate": "leuprolide", "thyroid": "levothyroxine", "endometrium": "",
               "lung": "", "ovary": "olaparib"}
