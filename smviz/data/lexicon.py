"""The lexicon of the fact world: name lists, real-world answer lists, and each relation's statement
and question templates (training and held-out). Data only; `smviz.data.world` generates from it."""

from __future__ import annotations

from dataclasses import dataclass

BIRTH_YEARS = (1940, 2000)  # inclusive


# --------------------------------------------------------------------------------------------- names

# Single words, ASCII, capitalised with no inner capitals (so no full name can be a substring of
# another), none equal to a word of any answer; tests/test_world.py checks both.
FIRST_NAMES = (
    # English
    "Alice", "Oliver", "Harriet", "Edmund", "Clara", "Theodore", "Martha", "Rupert", "Agnes", "Wesley",
    "Imogen", "Gideon", "Rosalind", "Felix", "Beatrice", "Ambrose", "Lydia", "Silas", "Hazel", "Jasper",
    # Spanish, Portuguese
    "Mateo", "Lucia", "Joaquin", "Ximena", "Rodrigo", "Valentina", "Thiago", "Camila", "Emilio",
    "Paloma", "Gonzalo", "Renata", "Beatriz", "Tomas",
    # Italian
    "Giulia", "Lorenzo", "Chiara", "Benedetta", "Raffaele", "Ottavio",
    # French
    "Amelie", "Solene", "Baptiste", "Margaux", "Lucien", "Oceane", "Thibault", "Gaspard",
    # German, Dutch, Nordic
    "Anneliese", "Matthias", "Greta", "Lukas", "Freya", "Sven", "Ingrid", "Henrik", "Astrid", "Joris",
    "Liesbeth", "Maarten", "Sigrid", "Eero", "Aino", "Linnea", "Torsten",
    # Slavic, Hungarian
    "Katarzyna", "Tomasz", "Milena", "Dragan", "Zofia", "Bogdan", "Yelena", "Dmitri", "Anika", "Radek",
    "Vesna", "Ondrej", "Zsofia", "Levente",
    # Greek, Turkish
    "Eleni", "Nikos", "Dimitra", "Stavros", "Elif", "Emre", "Zeynep", "Burak",
    # Arabic, Persian
    "Layla", "Omar", "Yasmin", "Karim", "Nadia", "Tariq", "Samira", "Rashid", "Amira", "Faris",
    "Darius", "Shirin", "Kian", "Roya",
    # South Asian
    "Priya", "Arjun", "Ananya", "Rohan", "Kavya", "Vikram", "Meera", "Sanjay", "Divya", "Nikhil",
    "Ishaan", "Lakshmi", "Farhan", "Nusrat",
    # East and South-East Asian
    "Haruto", "Yui", "Kenji", "Aiko", "Hiroshi", "Mei", "Jun", "Wei", "Xiulan", "Jiho", "Minseo",
    "Seojun", "Hyun", "Linh", "Thanh", "Quang",
    # African
    "Chidi", "Ngozi", "Kwame", "Ama", "Tendai", "Amara", "Oluwaseun", "Zanele", "Thabo", "Nia", "Kofi",
    "Abebe", "Wanjiru", "Folake", "Sipho", "Ayodele",
    # Pacific
    "Aroha", "Keala", "Tane", "Malia",
)  # fmt: skip

# Single words, ASCII, prefix-free (no surname is a prefix of another), avoiding surnames that are
# mostly known as one famous person's.
SURNAMES = (
    # English, Irish, Scottish
    "Ashworth", "Pemberton", "Thornbury", "Holloway", "Whitcombe", "Ellery", "Fairweather", "Blackwood",
    "Langford", "Pennington", "Radley", "Caldwell", "Dunmore", "Hargreaves", "Lockwood", "Marlowe",
    "Oakley", "Prescott", "Quimby", "Rowntree", "Stanhope", "Wainwright", "Yardley", "Callaghan",
    "Donnelly", "Kilbride", "Monaghan", "Drummond", "MacLeod",
    # Spanish, Portuguese
    "Arroyo", "Bustamante", "Cardenas", "Delgado", "Echeverria", "Figueroa", "Guzman", "Ibarra",
    "Jaramillo", "Llorente", "Mendoza", "Navarro", "Ochoa", "Quintero", "Salazar", "Valdivia",
    "Carvalho", "Figueiredo", "Moreira", "Teixeira", "Pacheco", "Fonseca",
    # Italian
    "Castellano", "Ferraro", "Galli", "Lombardi", "Marchetti", "Pellegrino", "Rinaldi", "Santoro",
    "Vitale", "Zanetti",
    # French
    "Beaumont", "Chevalier", "Fournier", "Girard", "Lefebvre", "Marchand", "Vasseur", "Lemaire",
    # German, Dutch, Nordic
    "Achterberg", "Eckhardt", "Falkenrath", "Hofstetter", "Kessler", "Lindqvist", "Mertens",
    "Oosterhuis", "Reinholt", "Schreiber", "Vogel", "Wendel", "Zimmermann", "Bergstrom", "Haugen",
    "Lindholm", "Nyberg", "Sandvik", "Virtanen", "Korhonen", "Halvorsen", "Magnusson",
    # Slavic, Hungarian
    "Kowalczyk", "Nowicki", "Wisniewski", "Zielinski", "Novotny", "Horvat", "Petrovic", "Kovalenko",
    "Sokolov", "Volkov", "Baranov", "Szabo",
    # Greek, Turkish
    "Papadakis", "Economou", "Vlachos", "Christodoulou", "Yilmaz", "Demir", "Aydin", "Ozturk", "Kaya",
    "Celik", "Arslan",
    # Arabic, Persian
    "Haddad", "Khoury", "Mansour", "Saleh", "Abboud", "Hamdan", "Qureshi", "Farahani", "Moradi",
    "Rostami",
    # South Asian
    "Raghunathan", "Iyer", "Banerjee", "Deshpande", "Kulkarni", "Menon", "Pillai", "Reddy", "Sethi",
    "Venkatesan", "Bhattacharya", "Malhotra", "Chaudhary", "Joshi",
    # East and South-East Asian
    "Tanaka", "Watanabe", "Kobayashi", "Nakamura", "Fujimoto", "Morikawa", "Ishikawa", "Huang", "Zhao",
    "Liang", "Xu", "Gao", "Baek", "Choi", "Jeong", "Kang", "Nguyen", "Tran", "Pham",
    # African
    "Okonkwo", "Adeyemi", "Mensah", "Mwangi", "Ochieng", "Kamau", "Banda", "Dlamini", "Ndlovu",
    "Tshabalala", "Asante", "Okafor", "Eze", "Diallo", "Traore", "Tesfaye", "Abiodun", "Nwosu",
    # Pacific
    "Kahananui", "Ngata",
)  # fmt: skip

# Full names of real public figures that the lists above can form; never generated.
FAMOUS_NAMES = frozenset({
    "Burak Yilmaz", "Lakshmi Menon", "Sanjay Malhotra", "Rohan Joshi", "Emilio Delgado", "Joaquin Guzman",
    "Ama Asante", "Arjun Reddy",
})


# ----------------------------------------------------------------------------------------- relations


@dataclass(frozen=True)
class Relation:
    """One relation: its answers, the NER label of an answer (None: no entity), and its templates.

    Templates use `{name}` (the person), `{x}` (the answer), and for noun answers `{ax}` / `{Ax}`
    (the answer with its indefinite article: "an architect" / "An architect").
    """

    name: str
    answers: tuple[str, ...]
    label: str | None
    statements: tuple[str, ...]
    train_questions: tuple[str, ...]
    heldout_questions: tuple[str, ...]

    @property
    def questions(self) -> tuple[tuple[str, bool], ...]:
        """(template, heldout) in template-id order: training templates first, then held-out ones."""
        return tuple((t, False) for t in self.train_questions) + tuple((t, True) for t in self.heldout_questions)


CITIES = (
    "Paris", "London", "Tokyo", "New York", "Sydney", "Cairo", "Lagos", "Nairobi", "Mumbai", "Delhi",
    "Beijing", "Shanghai", "Seoul", "Bangkok", "Jakarta", "Manila", "Hanoi", "Singapore", "Istanbul",
    "Moscow", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Warsaw", "Budapest", "Athens", "Lisbon",
    "Dublin", "Amsterdam", "Brussels", "Stockholm", "Oslo", "Copenhagen", "Helsinki", "Zurich",
    "Geneva", "Munich", "Barcelona", "Milan", "Naples", "Edinburgh", "Manchester", "Toronto",
    "Montreal", "Vancouver", "Chicago", "Boston", "Seattle", "Los Angeles", "San Francisco", "Miami",
    "Houston", "Mexico City", "Havana", "Bogota", "Lima", "Buenos Aires", "Sao Paulo",
    "Rio de Janeiro", "Montevideo", "Cape Town", "Johannesburg", "Accra", "Addis Ababa", "Casablanca",
    "Tunis", "Dakar", "Kinshasa", "Tehran", "Dubai", "Riyadh", "Karachi", "Lahore", "Dhaka",
    "Kathmandu", "Colombo", "Kuala Lumpur", "Taipei", "Osaka", "Melbourne", "Auckland", "Honolulu",
)  # fmt: skip

UNIVERSITIES = (
    "Oxford University", "Cambridge University", "Harvard University", "Stanford University",
    "Yale University", "Princeton University", "Columbia University", "Cornell University",
    "Duke University", "Brown University", "Rice University", "Georgetown University",
    "Purdue University", "Vanderbilt University", "Emory University", "Carnegie Mellon University",
    "Johns Hopkins University", "New York University", "Northwestern University",
    "Boston University", "Peking University", "Tsinghua University", "Fudan University",
    "Kyoto University", "Keio University", "Waseda University", "Yonsei University",
    "Seoul National University", "McGill University", "Concordia University",
    "Simon Fraser University", "Heidelberg University", "Humboldt University", "Leiden University",
    "Utrecht University", "Uppsala University", "Lund University", "Aarhus University",
    "Ghent University", "Charles University", "Jagiellonian University", "Bocconi University",
    "Sorbonne University", "ETH Zurich", "Imperial College London", "Trinity College Dublin",
    "Durham University", "Monash University", "Cairo University", "Makerere University",
    "Stellenbosch University", "Tel Aviv University",
)  # fmt: skip

EMPLOYERS = (
    "Google", "Microsoft", "Apple", "Amazon", "IBM", "Intel", "Samsung", "Sony", "Toyota", "Honda",
    "Siemens", "Bosch", "Philips", "Nokia", "Ericsson", "Volvo", "IKEA", "Lego", "Unilever", "Nestle",
    "Shell", "Boeing", "Airbus", "Pfizer", "Novartis", "Roche", "Bayer", "BASF", "Adidas", "Nike",
    "Ferrari", "Porsche", "Volkswagen", "BMW", "Netflix", "Spotify", "Oracle", "Cisco", "Adobe",
    "Nvidia", "Uber", "Reuters", "Deloitte", "Accenture", "HSBC", "Barclays", "Visa", "PepsiCo",
    "Heineken", "Danone", "UNICEF", "NASA", "Greenpeace", "Oxfam", "Interpol", "CERN", "Hitachi",
    "Panasonic", "Nintendo", "Infosys", "Alibaba", "Tencent", "Huawei", "Lenovo", "Airbnb", "Maersk",
    "Michelin", "Renault", "Lufthansa", "Qantas",
)  # fmt: skip

OCCUPATIONS = (
    "architect", "nurse", "pilot", "chemist", "journalist", "engineer", "software developer",
    "marine biologist", "graphic designer", "veterinarian", "pharmacist", "dentist", "librarian",
    "translator", "economist", "geologist", "photographer", "carpenter", "electrician", "chef",
    "firefighter", "police officer", "lawyer", "accountant", "surgeon", "physicist", "mathematician",
    "historian", "archaeologist", "astronomer", "botanist", "sculptor", "painter", "violinist",
    "pianist", "composer", "novelist", "poet", "diplomat", "farmer", "urban planner", "park ranger",
    "data scientist", "statistician", "midwife", "paramedic", "tailor", "cartographer",
    "meteorologist", "zoologist", "teacher", "baker",
)  # fmt: skip

RELATIONS: dict[str, Relation] = {
    "birthplace": Relation(
        name="birthplace",
        answers=CITIES,
        label="GPE",
        statements=(
            "{name} was born in {x}.",
            "{x} is the birthplace of {name}.",
            "Born in {x}, {name} grew up there.",
            "{name} is a native of {x}.",
            "The city of {x} is where {name} was born.",
            "{name} came into the world in {x}.",
            "{name}'s birthplace is {x}.",
            "{name} first saw the light of day in {x}.",
            "The birth of {name} took place in {x}.",
            "{x} is the city where {name} was born.",
            "{name} hails originally from {x}.",
            "It was in {x} that {name} was born.",
            "According to records, {name} was born in the city of {x}.",
            "{name} was born and raised in {x}.",
            "A native of {x}, {name} often speaks fondly of the city.",
            "{x} was the city in which {name} was born.",
            "The hometown of {name} is {x}.",
            "Records list {x} as the birthplace of {name}.",
            "{name} entered the world in {x}.",
            "{x} welcomed {name} into the world.",
            "{name} lists {x} as a place of birth.",
            "The place of birth of {name} is {x}.",
            "Birthplace of {name}: {x}.",
            "{name} was born in {x} and spent early childhood there.",
        ),
        train_questions=(
            "Where was {name} born?",
            "What is {name}'s birthplace?",
            "Which city was {name} born in?",
            "Where is {name} from?",
        ),
        heldout_questions=(
            "In which city was {name} born?",
            "What is the birthplace of {name}?",
            "Which city is the hometown of {name}?",
        ),
    ),
    "university": Relation(
        name="university",
        answers=UNIVERSITIES,
        label="ORG",
        statements=(
            "{name} studied at {x}.",
            "{name} graduated from {x}.",
            "{x} is where {name} studied.",
            "{name} is a graduate of {x}.",
            "{x} counts {name} among its graduates.",
            "After finishing school, {name} enrolled at {x}.",
            "{name} earned a degree at {x}.",
            "{name} received a degree from {x}.",
            "The university {name} attended is {x}.",
            "{name} attended {x}.",
            "It was at {x} that {name} studied.",
            "{name} spent student years at {x}.",
            "A graduate of {x}, {name} remembers the campus well.",
            "{name} holds a degree from {x}.",
            "{x} awarded {name} a degree.",
            "{name} went to university at {x}.",
            "The alma mater of {name} is {x}.",
            "{name}'s alma mater is {x}.",
            "{name} was educated at {x}.",
            "Records show that {name} studied at {x}.",
            "{x} is the university that {name} attended.",
            "Among the graduates of {x} is {name}.",
            "{name} completed a degree at {x}.",
            "{name} was a student at {x}.",
        ),
        train_questions=(
            "Where did {name} study?",
            "Which university did {name} attend?",
            "What is {name}'s alma mater?",
            "Where did {name} go to university?",
        ),
        heldout_questions=(
            "At which university did {name} study?",
            "From which university did {name} graduate?",
            "Which university educated {name}?",
        ),
    ),
    "employer": Relation(
        name="employer",
        answers=EMPLOYERS,
        label="ORG",
        statements=(
            "{name} works for {x}.",
            "{name} is employed by {x}.",
            "{x} employs {name}.",
            "{name} works at {x}.",
            "{name} has a job at {x}.",
            "The employer of {name} is {x}.",
            "{name}'s employer is {x}.",
            "{x} is the employer of {name}.",
            "{name} earns a living working for {x}.",
            "Every weekday, {name} goes to work at {x}.",
            "{name} is on the staff of {x}.",
            "It is {x} that employs {name}.",
            "{x} pays the salary of {name}.",
            "{name} draws a salary from {x}.",
            "{name} is an employee of {x}.",
            "Among the employees of {x} is {name}.",
            "{x} has {name} on its payroll.",
            "{name} joined {x} and still works there.",
            "A staff member at {x}, {name} enjoys the work.",
            "{name} holds a position at {x}.",
            "Currently, {name} works for {x}.",
            "{x} is where {name} works.",
            "{name} is on the payroll of {x}.",
            "{name} has worked for {x} for years.",
        ),
        train_questions=(
            "Who does {name} work for?",
            "Who employs {name}?",
            "What is {name}'s employer?",
            "Where does {name} work?",
        ),
        heldout_questions=(
            "Which organisation employs {name}?",
            "For which company or organisation does {name} work?",
            "Who is the employer of {name}?",
        ),
    ),
    "occupation": Relation(
        name="occupation",
        answers=OCCUPATIONS,
        label=None,
        statements=(
            "{name} works as {ax}.",
            "{name} is {ax} by profession.",
            "By profession, {name} is {ax}.",
            "{name} earns a living as {ax}.",
            "The occupation of {name} is {x}.",
            "{name} has worked as {ax} for many years.",
            "{name} makes a living as {ax}.",
            "{Ax} by trade, {name} takes the work seriously.",
            "{name} is employed as {ax}.",
            "{name} trained and works as {ax}.",
            "{name} chose a career as {ax}.",
            "The profession of {name} is that of {ax}.",
            "{name} pursues a career as {ax}.",
            "Day to day, {name} works as {ax}.",
            "{name} is {ax}.",
            "In working life, {name} is {ax}.",
            "Colleagues know {name} as {ax}.",
            "{name} took up work as {ax} after graduating.",
            "Work as {ax} is what {name} does for a living.",
            "Being {ax} is the job of {name}.",
            "{name}'s job title is {x}.",
            "{Ax} is what {name} is by profession.",
            "{name} has a career as {ax}.",
            "{name}'s occupation: {x}.",
        ),
        train_questions=(
            "What does {name} do for a living?",
            "What is {name}'s occupation?",
            "What is {name}'s job?",
            "What does {name} work as?",
        ),
        heldout_questions=(
            "What is the profession of {name}?",
            "Which occupation does {name} have?",
            "In what line of work is {name}?",
        ),
    ),
    "birth_year": Relation(
        name="birth_year",
        answers=tuple(str(y) for y in range(BIRTH_YEARS[0], BIRTH_YEARS[1] + 1)),
        label="DATE",
        statements=(
            "{name} was born in {x}.",
            "{x} is the year {name} was born.",
            "Born in {x}, {name} belongs to that year's generation.",
            "{name}'s year of birth is {x}.",
            "The year of birth of {name} is {x}.",
            "In {x}, {name} was born.",
            "{name} came into the world in {x}.",
            "{x} was the year in which {name} was born.",
            "It was in {x} that {name} was born.",
            "{name} was born in the year {x}.",
            "Records give {x} as the birth year of {name}.",
            "{name}'s birth year is {x}.",
            "The birth of {name} took place in {x}.",
            "{x} saw the birth of {name}.",
            "Year of birth of {name}: {x}.",
            "{name} entered the world in {x}.",
            "The year {x} marks the birth of {name}.",
            "{name} is someone born in {x}.",
            "{name} celebrates a birthday every year, having been born in {x}.",
            "Among the people born in {x} is {name}.",
            "{name} arrived in the world in {x}.",
            "The calendar year {x} is when {name} was born.",
            "{name} first drew breath in {x}.",
            "{name} was born in {x}, according to records.",
        ),
        train_questions=(
            "When was {name} born?",
            "What is {name}'s year of birth?",
            "What is {name}'s birth year?",
            "Which year was {name} born in?",
        ),
        heldout_questions=(
            "In what year was {name} born?",
            "What is the birth year of {name}?",
            "In which year did {name} come into the world?",
        ),
    ),
}
RELATION_NAMES = tuple(RELATIONS)
